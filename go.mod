module github.com/csi-nbd/csi-nbd

go 1.26.0

require (
	github.com/go-logr/logr v1.4.1 // indirect
	golang.org/x/sync v0.18.0 // indirect
	golang.org/x/sys v0.38.0 // indirect
	golang.org/x/time v0.16.0 // indirect
	k8s.io/klog/v2 v2.140.0 // indirect
)
