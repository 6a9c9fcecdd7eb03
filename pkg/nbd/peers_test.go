package nbd

// Interoperability tests: real NBD clients (libnbd's nbdinfo, nbdcopy and
// nbdsh, qemu-img, qemu-io, fio) are the oracle for the server. Each test
// skips when its tool is missing, except in CI (see requireTool).

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// runErr runs a tool and returns its combined output and error, for the
// tests that expect a failure.
func runErr(t testing.TB, name string, args ...string) (string, error) {
	t.Helper()
	requireTool(t, name)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	return string(out), err
}

// systemPython is the interpreter python3-libnbd is installed for; the
// python3 first on PATH may be another one (pyenv, a venv).
const systemPython = "/usr/bin/python3"

// runNbdsh runs nbdsh, which starts "python3 -m nbd" from PATH, with the
// system interpreter first on PATH.
func runNbdsh(t testing.TB, args ...string) string {
	t.Helper()
	requireTool(t, "nbdsh")
	requireTool(t, systemPython)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "nbdsh", args...)
	cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(systemPython)+string(os.PathListSeparator)+os.Getenv("PATH"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("nbdsh %v: %v\n%s", args, err, out)
	}
	return string(out)
}

// tcpURI is the libnbd URI of an export on the server's TCP listener.
func (s *testServer) tcpURI(export string) string {
	return "nbd://" + s.tcp + "/" + export
}

type nbdinfoJSON struct {
	Protocol   string           `json:"protocol"`
	TLS        bool             `json:"TLS"`
	Structured bool             `json:"structured"`
	Exports    []map[string]any `json:"exports"`
}

func nbdinfo(t testing.TB, args ...string) nbdinfoJSON {
	t.Helper()
	out := run(t, "nbdinfo", append([]string{"--json"}, args...)...)
	var info nbdinfoJSON
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	return info
}

func TestNbdinfoJSON(t *testing.T) {
	for _, c := range []struct {
		name     string
		caps     func(*backends.Caps)
		exportRO bool
	}{
		{name: "default"},
		{name: "native_fua", caps: func(c *backends.Caps) { c.FUA = true }},
		{name: "no_trim_fastzero_multiconn", caps: func(c *backends.Caps) { c.Trim, c.FastZero, c.MultiConn = false, false, false }},
		{name: "rotational_blocksizes", caps: func(c *backends.Caps) {
			c.Rotational, c.MinBlock, c.PrefBlock, c.MaxBlock = true, 512, 65536, 1<<20
		}},
		{name: "device_read_only", caps: func(c *backends.Caps) { c.ReadOnly, c.MultiConn = true, false }},
		{name: "export_read_only", exportRO: true},
	} {
		t.Run(c.name, func(t *testing.T) {
			dev := newTestDevice(16 << 20)
			if c.caps != nil {
				c.caps(&dev.caps)
			}
			caps := dev.caps
			s := startServer(t, staticExports{"": {Device: dev, Description: "test volume", ReadOnly: c.exportRO}})
			info := nbdinfo(t, s.uri(""))
			if info.Protocol != "newstyle-fixed" || !info.Structured || info.TLS {
				t.Errorf("protocol %q structured %v TLS %v", info.Protocol, info.Structured, info.TLS)
			}
			if len(info.Exports) != 1 {
				t.Fatalf("%d exports", len(info.Exports))
			}
			e := info.Exports[0]
			ro := caps.ReadOnly || c.exportRO
			minB, prefB, maxB := blockSizes(caps)
			want := map[string]any{
				"export-name":          "",
				"description":          "test volume",
				"export-size":          float64(16 << 20),
				"is_read_only":         ro,
				"is_rotational":        caps.Rotational,
				"can_flush":            true, // always: a no-op flush is still a flush
				"can_fua":              true, // emulated with Flush when not native
				"can_cache":            true,
				"can_df":               true,
				"can_trim":             !ro && caps.Trim,
				"can_zero":             !ro,
				"can_fast_zero":        !ro && caps.FastZero,
				"can_multi_conn":       ro || caps.MultiConn,
				"block_size_minimum":   float64(minB),
				"block_size_preferred": float64(prefB),
				"block_size_maximum":   float64(maxB),
			}
			for k, v := range want {
				if e[k] != v {
					t.Errorf("%s = %v, want %v", k, e[k], v)
				}
			}
			if fmt.Sprint(e["contexts"]) != "["+AllocationContext+"]" {
				t.Errorf("contexts %v", e["contexts"])
			}
			if t.Failed() {
				b, _ := json.MarshalIndent(e, "", "  ")
				t.Logf("%s", b)
			}
		})
	}
}

func TestNbdinfoList(t *testing.T) {
	exports := staticExports{
		"":          {Device: newTestDevice(1 << 20), Description: "the default"},
		"alpha":     {Device: newTestDevice(2 << 20), Description: "first volume"},
		"beta gama": {Device: newTestDevice(3 << 20)},
		"ro":        {Device: newTestDevice(4 << 20), Description: "read-only", ReadOnly: true},
	}
	s := startServer(t, exports)
	info := nbdinfo(t, "--list", s.uri(""))
	got := map[string]any{}
	for _, e := range info.Exports {
		name := e["export-name"].(string)
		got[name] = e["description"]
		if size := e["export-size"].(float64); size != float64(exports[name].Device.Size()) {
			t.Errorf("%q: size %v", name, size)
		}
		if e["is_read_only"] != exports[name].ReadOnly {
			t.Errorf("%q: is_read_only %v", name, e["is_read_only"])
		}
	}
	want := map[string]any{"": "the default", "alpha": "first volume", "beta gama": nil, "ro": "read-only"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("exports %v, want %v", got, want)
	}
	// The plain text listing too.
	out := run(t, "nbdinfo", "--list", s.uri(""))
	for _, w := range []string{"export=\"alpha\"", "description: first volume", "export=\"beta gama\""} {
		if !strings.Contains(out, w) {
			t.Errorf("nbdinfo --list output lacks %q:\n%s", w, out)
		}
	}
}

func TestNbdinfoSize(t *testing.T) {
	for _, size := range []int{16 << 20, 1<<20 + 512, 4096} {
		s := startServer(t, staticExports{"x": {Device: newTestDevice(size)}})
		out := run(t, "nbdinfo", "--size", s.uri("x"))
		if strings.TrimSpace(out) != fmt.Sprint(size) {
			t.Errorf("size %d: nbdinfo --size printed %q", size, out)
		}
	}
}

type mapExtent struct {
	Offset uint64 `json:"offset"`
	Length uint64 `json:"length"`
	Type   uint32 `json:"type"`
}

// nbdinfoMap returns `nbdinfo --map` with adjacent equal extents merged.
func nbdinfoMap(t testing.TB, uri string) []mapExtent {
	t.Helper()
	out := run(t, "nbdinfo", "--map", "--json", uri)
	var m []mapExtent
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	return mergeExtents(m)
}

func mergeExtents(in []mapExtent) []mapExtent {
	var out []mapExtent
	for _, e := range in {
		if n := len(out); n > 0 && out[n-1].Type == e.Type && out[n-1].Offset+out[n-1].Length == e.Offset {
			out[n-1].Length += e.Length
			continue
		}
		out = append(out, e)
	}
	return out
}

// expectedMap computes the base:allocation map the server should report
// for dev: holes where no block is allocated, "zero" for allocated blocks
// of zeros, data elsewhere.
func expectedMap(dev *testDevice) []mapExtent {
	data, alloc := dev.snapshot()
	var m []mapExtent
	for b, a := range alloc {
		off := uint64(b) * testBlock
		end := min(off+testBlock, uint64(len(data)))
		var typ uint32 = 3
		if a {
			typ = 0
			if bytes.Count(data[off:end], []byte{0}) == int(end-off) {
				typ = 2
			}
		}
		m = append(m, mapExtent{off, end - off, typ})
	}
	return mergeExtents(m)
}

func TestNbdinfoMap(t *testing.T) {
	dev := newTestDevice(8 << 20)
	s := startServer(t, staticExports{"": {Device: dev}})
	uri := s.uri("")
	if got := nbdinfoMap(t, uri); fmt.Sprint(got) != fmt.Sprint([]mapExtent{{0, 8 << 20, 3}}) {
		t.Fatalf("fresh device map %v", got)
	}
	// Writes, zeroes and trims through the server, with nbdsh.
	runNbdsh(t, "-u", uri,
		"-c", `h.pwrite(b"\x01" * 8192, 0)`,
		"-c", `h.pwrite(b"\x02" * 5000, 100000)`, // unaligned: blocks 24 and 25
		"-c", `h.pwrite(b"\x03" * (256 << 10), 2 << 20)`,
		"-c", `h.trim(64 << 10, (2 << 20) + 4000)`, // partial blocks stay allocated
		"-c", `h.zero(64 << 10, 4 << 20, nbd.CMD_FLAG_NO_HOLE)`, // allocated zeroes
		"-c", `h.pwrite(b"\x04" * 4096, 6 << 20)`,
		"-c", `h.zero(4096, 6 << 20)`, // punched again
		"-c", `h.pwrite(b"\x05" * 512, (8 << 20) - 512)`,
	)
	want := expectedMap(dev)
	got := nbdinfoMap(t, uri)
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("nbdinfo --map:\n got %v\nwant %v", got, want)
	}
	// Spot checks independent of the device's own bookkeeping.
	find := func(off uint64) uint32 {
		for _, e := range got {
			if off >= e.Offset && off < e.Offset+e.Length {
				return e.Type
			}
		}
		t.Fatalf("offset %d not mapped", off)
		return 0
	}
	for _, c := range []struct {
		off  uint64
		typ  uint32
		what string
	}{
		{0, 0, "written"}, {8192, 3, "never written"}, {24 * 4096, 0, "unaligned write"},
		{2<<20 + 4096, 3, "trimmed"}, {2<<20 + 1000, 0, "partial trim head"}, {2<<20 + 68*1024, 0, "partial trim tail"},
		{4 << 20, 2, "NO_HOLE zero"}, {6 << 20, 3, "zeroed"}, {8<<20 - 1, 0, "last block"},
	} {
		if typ := find(c.off); typ != c.typ {
			t.Errorf("%s at %d: type %d, want %d", c.what, c.off, typ, c.typ)
		}
	}
}

func randomFile(t testing.TB, path string, size int) []byte {
	t.Helper()
	b := make([]byte, size)
	rand.Read(b)
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return b
}

func fileSum(t testing.TB, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

func TestNbdcopyRoundTrip(t *testing.T) {
	const size = 32 << 20
	dir := t.TempDir()
	src := filepath.Join(dir, "src.img")
	want := randomFile(t, src, size)
	dev := newTestDevice(size)
	s := startServer(t, staticExports{"vol": {Device: dev}})

	for _, c := range []struct{ name, in, out string }{
		{"unix", s.uri("vol"), s.uri("vol")},
		{"tcp", s.tcpURI("vol"), s.tcpURI("vol")},
		{"unix_in_tcp_out", s.uri("vol"), s.tcpURI("vol")},
	} {
		t.Run(c.name, func(t *testing.T) {
			dev.Zero(context.Background(), 0, size, 0)
			run(t, "nbdcopy", "--connections=4", "--threads=4", src, c.in)
			if data, _ := dev.snapshot(); !bytes.Equal(data, want) {
				t.Fatal("device content differs from the source after nbdcopy file → export")
			}
			dst := filepath.Join(t.TempDir(), "dst.img")
			run(t, "nbdcopy", "--connections=4", "--threads=4", c.out, dst)
			if fileSum(t, dst) != sha256.Sum256(want) {
				t.Fatal("sha256 differs after export → file")
			}
		})
	}
	// Export to export, through both listeners at once.
	other := newTestDevice(size)
	s2 := startServer(t, staticExports{"copy": {Device: other}})
	run(t, "nbdcopy", "--connections=4", "--threads=4", s.uri("vol"), s2.tcpURI("copy"))
	if data, _ := other.snapshot(); !bytes.Equal(data, want) {
		t.Fatal("export → export copy differs")
	}
}

func TestNbdcopySparse(t *testing.T) {
	const size = 16 << 20
	dir := t.TempDir()
	src := filepath.Join(dir, "sparse.img")
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	chunks := map[int64][]byte{1 << 20: make([]byte, 64<<10), 5 << 20: make([]byte, 4096), size - 8192: make([]byte, 8192)}
	for off, b := range chunks {
		rand.Read(b)
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()

	// Start from a device full of data: nbdcopy must punch the holes.
	dev := newTestDevice(size)
	full := make([]byte, size)
	rand.Read(full)
	dev.WriteAt(context.Background(), full, 0, false)
	s := startServer(t, staticExports{"": {Device: dev}})
	run(t, "nbdcopy", "--connections=4", "--threads=4", src, s.uri(""))

	want, _ := os.ReadFile(src)
	if data, _ := dev.snapshot(); !bytes.Equal(data, want) {
		t.Fatal("device content differs from the sparse source")
	}
	got := nbdinfoMap(t, s.uri(""))
	wantMap := []mapExtent{
		{0, 1 << 20, 3}, {1 << 20, 64 << 10, 0}, {1<<20 + 64<<10, 5<<20 - (1<<20 + 64<<10), 3},
		{5 << 20, 4096, 0}, {5<<20 + 4096, size - 8192 - (5<<20 + 4096), 3}, {size - 8192, 8192, 0},
	}
	if fmt.Sprint(got) != fmt.Sprint(wantMap) {
		t.Fatalf("holes not preserved:\n got %v\nwant %v", got, wantMap)
	}

	// And back: export → file keeps the holes sparse on disk.
	dst := filepath.Join(dir, "back.img")
	run(t, "nbdcopy", s.uri(""), dst)
	if fileSum(t, dst) != sha256.Sum256(want) {
		t.Fatal("export → file differs")
	}
	if fi, err := os.Stat(dst); err == nil {
		if st, ok := fi.Sys().(interface{ Blocks() int64 }); ok && st.Blocks()*512 >= size {
			t.Logf("note: destination not sparse (%d blocks)", st.Blocks())
		}
	}
}

func TestQemuImg(t *testing.T) {
	const size = 8 << 20
	dir := t.TempDir()
	src := filepath.Join(dir, "src.img")
	f, _ := os.Create(src)
	f.Truncate(size)
	data := make([]byte, 1<<20)
	rand.Read(data)
	f.WriteAt(data, 2<<20)
	f.WriteAt(data[:4096], size-4096)
	f.Close()
	want, _ := os.ReadFile(src)

	for _, c := range []struct{ name, target string }{
		{"nbd_unix_uri", ""},
		{"legacy_nbd_unix", "legacy"},
		{"tcp", "tcp"},
	} {
		t.Run(c.name, func(t *testing.T) {
			dev := newTestDevice(size)
			s := startServer(t, staticExports{"disk": {Device: dev}})
			target := s.uri("disk")
			switch c.target {
			case "legacy":
				target = "nbd:unix:" + s.sock + ":exportname=disk"
			case "tcp":
				target = s.tcpURI("disk")
			}
			run(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, target)
			if got, _ := dev.snapshot(); !bytes.Equal(got, want) {
				t.Fatal("device differs after qemu-img convert")
			}
			out := run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, target)
			if !strings.Contains(out, "identical") {
				t.Fatalf("compare: %s", out)
			}
			var info struct {
				VirtualSize uint64 `json:"virtual-size"`
				Format      string `json:"format"`
			}
			out = run(t, "qemu-img", "info", "--output=json", "-f", "raw", target)
			if err := json.Unmarshal([]byte(out), &info); err != nil || info.VirtualSize != size || info.Format != "raw" {
				t.Fatalf("info (%v): %s", err, out)
			}
			var m []struct {
				Start  uint64 `json:"start"`
				Length uint64 `json:"length"`
				Data   bool   `json:"data"`
				Zero   bool   `json:"zero"`
			}
			out = run(t, "qemu-img", "map", "--output=json", "-f", "raw", target)
			if err := json.Unmarshal([]byte(out), &m); err != nil {
				t.Fatalf("%v: %s", err, out)
			}
			var got []mapExtent
			for _, e := range m {
				var typ uint32
				if !e.Data {
					typ |= 1
				}
				if e.Zero {
					typ |= 2
				}
				got = append(got, mapExtent{e.Start, e.Length, typ})
			}
			got = mergeExtents(got)
			if fmt.Sprint(got) != fmt.Sprint(expectedMap(dev)) {
				t.Fatalf("qemu-img map:\n got %v\nwant %v", got, expectedMap(dev))
			}
			// And back to a file.
			dst := filepath.Join(t.TempDir(), "back.img")
			run(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", target, dst)
			if fileSum(t, dst) != sha256.Sum256(want) {
				t.Fatal("export → file differs")
			}
			// A difference must be noticed.
			dev.WriteAt(context.Background(), []byte{0xff}, 3<<20+7, false)
			if out, err := runErr(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, target); err == nil {
				t.Fatalf("compare missed a difference: %s", out)
			}
		})
	}
}

func TestQemuIo(t *testing.T) {
	dev := newTestDevice(4 << 20)
	full := bytes.Repeat([]byte{0x5a}, 4<<20)
	dev.WriteAt(context.Background(), full, 0, false)
	s := startServer(t, staticExports{"": {Device: dev}})
	out := run(t, "qemu-io", "-f", "raw",
		"-c", "write -P 0xab 0 1M",
		"-c", "write -z 1M 1M",
		"-c", "discard 2M 1M",
		"-c", "read -P 0xab 0 1M",
		"-c", "read -P 0 1M 2M",
		"-c", "read -P 0x5a 3M 1M",
		"-c", "write -P 0xcd -f 3M 4k", // FUA
		"-c", "flush",
		s.uri(""))
	for _, bad := range []string{"error", "failed", "Pattern verification"} {
		if strings.Contains(strings.ToLower(out), strings.ToLower(bad)) {
			t.Fatalf("qemu-io reported %q:\n%s", bad, out)
		}
	}
	data, alloc := dev.snapshot()
	want := append(append(append(bytes.Repeat([]byte{0xab}, 1<<20), make([]byte, 2<<20)...),
		bytes.Repeat([]byte{0xcd}, 4096)...), bytes.Repeat([]byte{0x5a}, 1<<20-4096)...)
	if !bytes.Equal(data, want) {
		t.Fatal("device content wrong after qemu-io")
	}
	// The discarded range is a hole now.
	if alloc[(2<<20)/testBlock] || alloc[(3<<20)/testBlock-1] {
		t.Error("discard did not punch a hole")
	}
	if flushes, _, _, _ := dev.counters(); flushes < 2 {
		t.Errorf("%d flushes: want one for the emulated FUA write and one for flush", flushes)
	}
	// A wrong pattern must fail: qemu-io is a real oracle here.
	if out, err := runErr(t, "qemu-io", "-f", "raw", "-c", "read -P 0xab 1M 4k", s.uri("")); err == nil && !strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("qemu-io did not notice a wrong pattern:\n%s", out)
	}
}

// corruptingDevice flips a bit in everything it reads.
type corruptingDevice struct{ *testDevice }

func (d corruptingDevice) Lend(off, length uint64, dst [][]byte) ([][]byte, bool, error) {
	return lendViaReadAt(d, off, length, dst)
}

func (d corruptingDevice) ReadAt(ctx context.Context, p []byte, off uint64) error {
	err := d.testDevice.ReadAt(ctx, p, off)
	p[len(p)/2] ^= 1
	return err
}

func fioVerify(t *testing.T, uri, out string) (string, error) {
	return runErr(t, "fio", "--name=verify", "--ioengine=nbd", "--uri="+uri,
		"--rw=randrw", "--bsrange=512-64k", "--size=64M", "--iodepth=32",
		"--time_based", "--runtime=2", "--verify=crc32c", "--verify_fatal=1",
		"--verify_backlog=1024", "--verify_state_save=0", "--output-format=json", "--output="+out)
}

func TestFioVerify(t *testing.T) {
	requireTool(t, "fio")
	dev := newTestDevice(64 << 20)
	bad := corruptingDevice{newTestDevice(64 << 20)}
	s := startServer(t, staticExports{"": {Device: dev}, "bad": {Device: bad}})
	t.Run("negative_control", func(t *testing.T) {
		// fio must notice corrupted data, or its verdict means nothing.
		log, err := fioVerify(t, s.uri("bad"), filepath.Join(t.TempDir(), "fio.json"))
		if err == nil {
			t.Fatalf("fio verified data that a device corrupted:\n%s", log)
		}
	})
	for _, c := range []struct{ name, uri string }{{"unix", s.uri("")}, {"tcp", s.tcpURI("")}} {
		t.Run(c.name, func(t *testing.T) {
			out := filepath.Join(t.TempDir(), "fio.json")
			log, err := fioVerify(t, c.uri, out)
			if err != nil {
				t.Fatalf("fio: %v\n%s", err, log)
			}
			b, err := os.ReadFile(out)
			if err != nil {
				t.Fatal(err)
			}
			var res struct {
				Jobs []struct {
					Error int `json:"error"`
					Read  struct {
						IOBytes uint64 `json:"io_bytes"`
					} `json:"read"`
					Write struct {
						IOBytes uint64 `json:"io_bytes"`
					} `json:"write"`
				} `json:"jobs"`
			}
			if err := json.Unmarshal(b, &res); err != nil || len(res.Jobs) != 1 {
				t.Fatalf("fio output (%v): %s", err, b)
			}
			j := res.Jobs[0]
			if j.Error != 0 || j.Read.IOBytes == 0 || j.Write.IOBytes == 0 {
				t.Fatalf("fio: error %d, read %d bytes, wrote %d bytes\n%s", j.Error, j.Read.IOBytes, j.Write.IOBytes, log)
			}
			if strings.Contains(log, "verify:") || strings.Contains(log, "bad magic") {
				t.Fatalf("fio reported verify failures:\n%s", log)
			}
		})
	}
}
