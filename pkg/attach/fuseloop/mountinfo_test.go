package fuseloop

import (
	"fmt"
	"strings"
	"testing"
)

func TestParseMountinfo(t *testing.T) {
	in := "22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw\n" +
		`36 35 98:0 /mnt1 /mnt/with\040space\011tab rw,noatime master:1 - ext3 /dev/root rw,errors=continue` + "\n" +
		"42 27 0:39 / /var/lib/x/vol rw,nosuid,nodev,noexec,relatime - fuse.csi-nbd-fuseloop csi-nbd rw,user_id=0\n" +
		`43 27 0:40 / /a\134b\\c\0 rw - tmpfs no\040ne rw` + "\n"
	got, err := parseMountinfo(strings.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	want := []mountEntry{
		{"/proc", "proc", "proc"},
		{"/mnt/with space\ttab", "ext3", "/dev/root"},
		{"/var/lib/x/vol", "fuse.csi-nbd-fuseloop", "csi-nbd"},
		{`/a\b\\c\0`, "tmpfs", "no ne"},
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("got %q\nwant %q", got, want)
	}
	for _, bad := range []string{"1 2 3", "1 2 3:4 / /x rw shared:1 ext4 /dev/x rw", "1 2 3:4 / /x rw - ext4"} {
		if _, err := parseMountinfo(strings.NewReader(bad)); err == nil {
			t.Errorf("parsed malformed line %q", bad)
		}
	}
}

func TestUnder(t *testing.T) {
	for _, c := range []struct {
		p, dir string
		want   bool
	}{
		{"/a/b", "/a", true},
		{"/a", "/a", true},
		{"/a/b/c", "/a/", true},
		{"/ab", "/a", false},
		{"/a-other/disk", "/a", false},
		{"/", "/a", false},
	} {
		if got := under(c.p, c.dir); got != c.want {
			t.Errorf("under(%q, %q) = %v", c.p, c.dir, got)
		}
	}
}

// escapeOctal escapes like the kernel's seq_escape(m, s, " \t\n\\").
func escapeOctal(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if c := s[i]; c == ' ' || c == '\t' || c == '\n' || c == '\\' {
			fmt.Fprintf(&b, `\%03o`, c)
		} else {
			b.WriteByte(c)
		}
	}
	return b.String()
}

// FuzzParseMountinfo: no panics, and whatever parses survives being
// written back the way the kernel writes it.
func FuzzParseMountinfo(f *testing.F) {
	f.Add("22 1 0:21 / /proc rw,nosuid shared:12 - proc proc rw\n")
	f.Add(`36 35 98:0 /mnt1 /mnt/with\040space rw master:1 - ext3 /dev/root rw` + "\n")
	f.Add(`1 2 0:3 / /x\134\0 rw - fuse.a b\011 rw` + "\n\n")
	f.Fuzz(func(t *testing.T, data string) {
		ms, err := parseMountinfo(strings.NewReader(data))
		if err != nil {
			return
		}
		for _, m := range ms {
			line := fmt.Sprintf("1 2 0:3 / %s rw - %s %s rw",
				escapeOctal(m.MountPoint), escapeOctal(m.FSType), escapeOctal(m.Source))
			again, err := parseMountinfoLine(line)
			if err != nil {
				t.Fatalf("%+v written back as %q does not parse: %v", m, line, err)
			}
			if again != m {
				t.Fatalf("%+v written back as %q parses as %+v", m, line, again)
			}
		}
	})
}
