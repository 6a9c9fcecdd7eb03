// Package vm tests kernel attach against the real nbd driver: it boots a
// Debian kernel under qemu (software emulation, no network) with an
// initramfs holding a static csi-nbd, and runs guest.sh inside: the
// attach tests, then csi-sanity (built statically, with util-linux and
// e2fsprogs for mount-utils) against `csi-nbd all` on kernel attach. See
// vm_test.go; run with `go test ./test/vm` (needs qemu-system-x86_64,
// busybox-static, e2fsprogs and apt-get to fetch the kernel once).
package vm
