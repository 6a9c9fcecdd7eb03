package driver

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// The kubelet's plugin watcher dials DIR/NAME-reg.sock and asks GetInfo;
// this plays the kubelet.
func TestServeRegistration(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	reg := &Registration{Name: DefaultName, Endpoint: "/var/lib/kubelet/plugins/csi-nbd.io/csi.sock"}
	go func() {
		done <- ServeRegistration(ctx, dir, reg)
	}()
	sock := filepath.Join(dir, DefaultName+"-reg.sock")
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := registerapi.NewRegistrationClient(conn)
	var info *registerapi.PluginInfo
	for deadline := time.Now().Add(10 * time.Second); ; {
		cctx, ccancel := context.WithTimeout(ctx, time.Second)
		info, err = c.GetInfo(cctx, &registerapi.InfoRequest{})
		ccancel()
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	if info.Type != registerapi.CSIPlugin || info.Name != DefaultName || info.Endpoint != "/var/lib/kubelet/plugins/csi-nbd.io/csi.sock" || len(info.SupportedVersions) == 0 {
		t.Errorf("GetInfo = %v", info)
	}
	// Not ready until the kubelet says it registered the plugin.
	if err := reg.Registered(ctx); err == nil {
		t.Error("Registered before the kubelet's notification")
	}
	if _, err := c.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: false, Error: "no"}); err != nil {
		t.Errorf("NotifyRegistrationStatus: %v", err)
	}
	if err := reg.Registered(ctx); err == nil {
		t.Error("Registered after the kubelet refused it")
	}
	if _, err := c.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: true}); err != nil {
		t.Errorf("NotifyRegistrationStatus: %v", err)
	}
	if err := reg.Registered(ctx); err != nil {
		t.Errorf("after registration: %v", err)
	}
	cancel()
	<-done
}
