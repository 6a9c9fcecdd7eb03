package vm

import (
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"
)

// cpioWriter writes the "newc" format the kernel unpacks as initramfs.
type cpioWriter struct {
	w    io.Writer
	ino  int
	dirs map[string]bool
	err  error
}

func newCpio(w io.Writer) *cpioWriter {
	return &cpioWriter{w: w, ino: 1, dirs: map[string]bool{"": true, ".": true}}
}

func (c *cpioWriter) entry(name string, mode uint32, data []byte) {
	if c.err != nil {
		return
	}
	c.ino++
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name)+1, 0)
	buf := []byte(hdr + name + "\x00")
	for len(buf)%4 != 0 {
		buf = append(buf, 0)
	}
	buf = append(buf, data...)
	for len(buf)%4 != 0 {
		buf = append(buf, 0)
	}
	_, c.err = c.w.Write(buf)
}

// mkdirAll adds dir and its parents.
func (c *cpioWriter) mkdirAll(dir string) {
	dir = strings.Trim(path.Clean(dir), "/")
	if c.dirs[dir] {
		return
	}
	c.mkdirAll(path.Dir(dir))
	c.dirs[dir] = true
	c.entry(dir, 0o040755, nil)
}

func (c *cpioWriter) file(name string, mode os.FileMode, data []byte) {
	name = strings.Trim(name, "/")
	c.mkdirAll(path.Dir(name))
	c.entry(name, 0o100000|uint32(mode.Perm()), data)
}

func (c *cpioWriter) symlink(name, target string) {
	name = strings.Trim(name, "/")
	c.mkdirAll(path.Dir(name))
	c.entry(name, 0o120777, []byte(target))
}

func (c *cpioWriter) close() error {
	c.entry("TRAILER!!!", 0, nil)
	return c.err
}

// tree is the initramfs content: guest path → host file (or content).
type tree struct {
	files    map[string]string // guest path → host path
	data     map[string][]byte
	modes    map[string]os.FileMode
	symlinks map[string]string
}

func newTree() *tree {
	return &tree{files: map[string]string{}, data: map[string][]byte{}, modes: map[string]os.FileMode{}, symlinks: map[string]string{}}
}

func (t *tree) write(w io.Writer) error {
	c := newCpio(w)
	names := make([]string, 0, len(t.files)+len(t.data))
	for n := range t.files {
		names = append(names, n)
	}
	for n := range t.data {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		b, ok := t.data[n]
		mode := t.modes[n]
		if !ok {
			var err error
			if b, err = os.ReadFile(t.files[n]); err != nil {
				return err
			}
			if mode == 0 {
				st, err := os.Stat(t.files[n])
				if err != nil {
					return err
				}
				mode = st.Mode()
			}
		}
		if mode == 0 {
			mode = 0o644
		}
		c.file(n, mode, b)
	}
	links := make([]string, 0, len(t.symlinks))
	for n := range t.symlinks {
		links = append(links, n)
	}
	sort.Strings(links)
	for _, n := range links {
		c.symlink(n, t.symlinks[n])
	}
	return c.close()
}
