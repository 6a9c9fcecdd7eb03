//go:build !fuseloop

package attach

// Without the fuseloop package linked in there is no fallback:
// Options.Fallback "always" fails and "auto" needs the nbd driver.
