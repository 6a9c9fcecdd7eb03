package fuseloop

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"strings"
)

// mountEntry is one line of /proc/self/mountinfo, the fields we use.
type mountEntry struct {
	MountPoint string
	FSType     string
	Source     string
}

// parseMountinfo reads mountinfo(5) lines: "ID PARENT MAJ:MIN ROOT
// MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS". Paths have
// space, tab, newline and backslash escaped as \ooo.
func parseMountinfo(r io.Reader) ([]mountEntry, error) {
	var out []mountEntry
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if line == "" {
			continue
		}
		e, err := parseMountinfoLine(line)
		if err != nil {
			return nil, fmt.Errorf("mountinfo line %d: %w", n, err)
		}
		out = append(out, e)
	}
	return out, sc.Err()
}

func parseMountinfoLine(line string) (mountEntry, error) {
	// Fields are separated by single spaces; whitespace inside them is
	// escaped, so splitting on anything else (strings.Fields would split
	// on \r or U+0085) could cut a path.
	fields := strings.Split(line, " ")
	sep := -1
	for i := 6; i < len(fields); i++ {
		if fields[i] == "-" {
			sep = i
			break
		}
	}
	if sep < 0 || len(fields) < sep+3 || fields[4] == "" || fields[sep+1] == "" || fields[sep+2] == "" {
		return mountEntry{}, fmt.Errorf("malformed: %q", line)
	}
	return mountEntry{
		MountPoint: unescapeOctal(fields[4]),
		FSType:     unescapeOctal(fields[sep+1]),
		Source:     unescapeOctal(fields[sep+2]),
	}, nil
}

// unescapeOctal undoes the kernel's \ooo escaping; anything that is not a
// valid escape is kept as it is.
func unescapeOctal(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && isOctal(s, i+1) {
			b.WriteByte((s[i+1]-'0')<<6 | (s[i+2]-'0')<<3 | (s[i+3] - '0'))
			i += 3
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// isOctal reports whether s[i:i+3] is three octal digits of a byte value.
func isOctal(s string, i int) bool {
	if i+3 > len(s) {
		return false
	}
	for j := i; j < i+3; j++ {
		if s[j] < '0' || s[j] > '7' {
			return false
		}
	}
	return s[i] <= '3'
}

func readMounts() ([]mountEntry, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return parseMountinfo(f)
}

// isMountPoint reports whether path is a mount point in our namespace.
func isMountPoint(path string) (bool, error) {
	ms, err := readMounts()
	if err != nil {
		return false, err
	}
	for _, m := range ms {
		if m.MountPoint == path {
			return true, nil
		}
	}
	return false, nil
}

// under reports whether p is dir or inside it.
func under(p, dir string) bool {
	return p == dir || strings.HasPrefix(p, strings.TrimSuffix(dir, "/")+"/")
}
