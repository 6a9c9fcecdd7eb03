package backends

import (
	"crypto/x509"
	"fmt"
	"os"
)

// SystemCertPoolWith returns the system's trusted CAs plus those in the PEM
// file at path, for backends' ca= options (an https origin or endpoint
// signed by a private CA).
func SystemCertPoolWith(path string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	pool, err := x509.SystemCertPool()
	if err != nil {
		pool = x509.NewCertPool()
	}
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("no PEM certificate in %s", path)
	}
	return pool, nil
}
