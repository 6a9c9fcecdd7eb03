package driver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"

	"google.golang.org/grpc"
	"k8s.io/klog/v2"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// Registration answers the kubelet's plugin watcher, which finds our
// socket in its plugins_registry directory: the node plugin registers
// itself, with no node-driver-registrar sidecar to keep in step.
type Registration struct {
	registerapi.UnimplementedRegistrationServer
	Name string
	// Endpoint is the CSI socket path as the kubelet sees it.
	Endpoint string

	registered atomic.Bool
}

// Registered is a readiness check: nil once the kubelet has accepted the
// plugin. Until then the node cannot stage volumes, and provisioning a
// WaitForFirstConsumer volume there finds no topology for the node.
func (r *Registration) Registered(context.Context) error {
	if !r.registered.Load() {
		return errors.New("not registered with the kubelet yet")
	}
	return nil
}

func (r *Registration) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              r.Name,
		Endpoint:          r.Endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (r *Registration) NotifyRegistrationStatus(_ context.Context, s *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	r.registered.Store(s.PluginRegistered)
	if s.PluginRegistered {
		klog.InfoS("Registered with the kubelet", "driver", r.Name)
	} else {
		klog.ErrorS(nil, "The kubelet refused the registration", "driver", r.Name, "error", s.Error)
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

// ServeRegistration serves r on DIR/NAME-reg.sock until ctx ends.
func ServeRegistration(ctx context.Context, dir string, r *Registration) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("plugin registration directory: %w", err)
	}
	sock := filepath.Join(dir, r.Name+"-reg.sock")
	_ = os.Remove(sock)
	ln, err := net.Listen("unix", sock)
	if err != nil {
		return fmt.Errorf("plugin registration socket: %w", err)
	}
	srv := grpc.NewServer()
	registerapi.RegisterRegistrationServer(srv, r)
	go func() {
		<-ctx.Done()
		srv.Stop()
		_ = os.Remove(sock)
	}()
	klog.InfoS("Serving kubelet plugin registration", "socket", sock, "endpoint", r.Endpoint)
	return srv.Serve(ln)
}
