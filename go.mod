module github.com/csi-nbd/csi-nbd

go 1.24.0

require (
	golang.org/x/sync v0.18.0
	golang.org/x/sys v0.38.0
	k8s.io/klog/v2 v2.140.0
)

require github.com/go-logr/logr v1.4.1 // indirect
