package main

import (
	"context"
	"fmt"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/nbd"
)

// exportTable decides which export names `csi-nbd serve` opens: the
// default spec, and other specs only when the operator allowed them, so a
// network client can never make the server open a backend nobody chose.
type exportTable struct {
	pool     *backends.Pool
	def      *backends.Spec
	allow    []string
	readOnly bool
}

func (t *exportTable) resolve(name string) (backends.Spec, error) {
	if name == "" {
		if t.def == nil {
			return backends.Spec{}, fmt.Errorf("%w: this server has no default export", nbd.ErrUnknownExport)
		}
		return *t.def, nil
	}
	spec, err := backends.Parse(name)
	if err != nil {
		return backends.Spec{}, fmt.Errorf("%w: %v", nbd.ErrUnknownExport, err)
	}
	canon := spec.String()
	if t.def != nil && canon == t.def.String() {
		return spec, nil
	}
	for _, p := range t.allow {
		if globMatch(p, name) || globMatch(p, canon) {
			return spec, nil
		}
	}
	return backends.Spec{}, fmt.Errorf("%w: %q matches no --allow pattern", nbd.ErrNotAllowed, truncate(canon))
}

func (t *exportTable) Open(ctx context.Context, name string) (*nbd.Export, func(), error) {
	spec, err := t.resolve(name)
	if err != nil {
		return nil, nil, err
	}
	dev, release, err := t.pool.Acquire(ctx, spec)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: opening %q: %v", nbd.ErrUnknownExport, truncate(spec.Redacted()), err)
	}
	return &nbd.Export{Device: dev, Description: spec.String(), ReadOnly: t.readOnly}, release, nil
}

// List offers the default export (the empty name), described by its spec.
// Allowed patterns are not names, so they are not listed.
func (t *exportTable) List(context.Context) []nbd.ExportInfo {
	if t.def == nil {
		return nil
	}
	return []nbd.ExportInfo{{Name: "", Description: t.def.String()}}
}

// globMatch reports whether name matches pattern, where * matches any run
// of characters (including / , ;) and ? any one byte; nothing else is
// special, so specs and URLs need no escaping.
func globMatch(pattern, name string) bool {
	px, nx := 0, 0
	starP, starN := -1, 0
	for nx < len(name) {
		switch {
		case px < len(pattern) && (pattern[px] == '?' || pattern[px] == name[nx]):
			px++
			nx++
		case px < len(pattern) && pattern[px] == '*':
			starP, starN = px, nx
			px++
		case starP >= 0:
			px = starP + 1
			starN++
			nx = starN
		default:
			return false
		}
	}
	for px < len(pattern) && pattern[px] == '*' {
		px++
	}
	return px == len(pattern)
}

func truncate(s string) string {
	if len(s) > 100 {
		return s[:100] + "…"
	}
	return s
}
