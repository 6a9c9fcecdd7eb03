package kube

import (
	"fmt"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

// NewClient connects to the API server: with the kubeconfig file given
// (--kubeconfig, for running outside a cluster), else in-cluster with the
// pod's service account.
func NewClient(kubeconfig, userAgent string) (kubernetes.Interface, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		if kubeconfig == "" {
			return nil, fmt.Errorf("kube: not in a cluster and no --kubeconfig: %w", err)
		}
		return nil, fmt.Errorf("kube: kubeconfig %q: %w", kubeconfig, err)
	}
	if userAgent != "" {
		cfg.UserAgent = userAgent
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kube: %w", err)
	}
	return cs, nil
}
