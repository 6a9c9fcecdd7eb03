package s3

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/csi-nbd/csi-nbd/internal/devtest"
	"github.com/csi-nbd/csi-nbd/internal/testpki"
	"github.com/csi-nbd/csi-nbd/internal/testserver"
	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

const bucketName = "volumes"

// gw is a versitygw with one bucket, and helpers to name volumes on it.
type gw struct {
	*testserver.Versitygw
	t testing.TB
}

func startGW(t testing.TB) *gw {
	v := testserver.StartVersitygw(t)
	v.CreateBucket(bucketName)
	return &gw{Versitygw: v, t: t}
}

// spec is the spec of the volume at prefix on g with extra options.
func (g *gw) spec(prefix, opts string) backends.Spec {
	g.t.Helper()
	s := "endpoint=" + g.Endpoint() + ",path-style=true"
	if !strings.Contains(opts, "timeout=") {
		s += ",timeout=5s"
	}
	if opts != "" {
		s += "," + opts
	}
	sp, err := backends.Parse(s + ";s3://" + bucketName + "/" + prefix)
	if err != nil {
		g.t.Fatal(err)
	}
	return sp
}

func (g *gw) env(owner string) backends.Env {
	return backends.Env{Secrets: g.Secrets(), Owner: owner}
}

func (g *gw) open(prefix, opts, owner string) (*Device, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return Open(ctx, g.spec(prefix, opts), g.env(owner))
}

func (g *gw) mustOpen(t testing.TB, prefix, opts, owner string) *Device {
	t.Helper()
	d, err := g.open(prefix, opts, owner)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// chunks lists the chunk object names under prefix.
func (g *gw) chunks(prefix string) []string {
	g.t.Helper()
	keys, err := g.Keys(bucketName, prefix+"/"+chunkDir)
	if err != nil {
		g.t.Fatal(err)
	}
	for i, k := range keys {
		keys[i] = strings.TrimPrefix(k, prefix+"/"+chunkDir)
	}
	return keys
}

func chunkName(i uint64) string { return fmt.Sprintf("%016x", i) }

// image is random data with zero runs: whole zero chunks (never stored)
// and zeros inside chunks (stored, within their chunk).
func image(size, chunk int) []byte {
	b := make([]byte, size)
	rand.Read(b)
	clear(b[chunk : 2*chunk])       // chunk 1: all zeros
	clear(b[3*chunk+100 : 4*chunk]) // chunk 3: mostly zeros
	clear(b[size-chunk : size])     // the last chunk
	return b
}

// Random data written with nbdcopy reads back the same through NBD,
// whole-zero chunks store nothing, and it survives closing and reopening
// the volume (a restarted server).
func TestNbdcopyRoundTrip(t *testing.T) {
	g := startGW(t)
	const chunk = 256 << 10
	const size = 24 << 20
	data := image(size, chunk)
	in := filepath.Join(t.TempDir(), "in")
	if err := os.WriteFile(in, data, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, wb := range []string{"writeback=4Mi", "writeback=0"} {
		t.Run(wb, func(t *testing.T) {
			prefix := "rt-" + strings.TrimPrefix(wb, "writeback=")
			opts := "size=24Mi,chunk=256Ki," + wb
			d, err := g.open(prefix, opts, "node-a")
			if err != nil {
				t.Fatal(err)
			}
			uri := testserver.ServeNBDURI(t, d)
			testserver.Run(t, "nbdcopy", "--connections=4", "--threads=4", in, uri)
			out := filepath.Join(t.TempDir(), "out")
			testserver.Run(t, "nbdcopy", "--connections=4", "--threads=4", uri, out)
			if got, _ := os.ReadFile(out); !bytes.Equal(got, data) {
				t.Fatal("data read back through NBD differs from what was written")
			}
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			// Whole-zero chunks have no object, every other chunk has one.
			objs := g.chunks(prefix)
			if len(objs) != size/chunk-2 {
				t.Errorf("%d chunk objects, want %d", len(objs), size/chunk-2)
			}
			for _, name := range objs {
				if name == chunkName(1) || name == chunkName(size/chunk-1) {
					t.Errorf("all-zero chunk %s was stored", name)
				}
			}
			// Reopened (as by a restarted server), it holds the same.
			d2 := g.mustOpen(t, prefix, "chunk=256Ki", "node-a")
			if d2.Size() != size {
				t.Fatalf("reopened size %d", d2.Size())
			}
			uri2 := testserver.ServeNBDURI(t, d2)
			out2 := filepath.Join(t.TempDir(), "out2")
			testserver.Run(t, "nbdcopy", uri2, out2)
			if got, _ := os.ReadFile(out2); !bytes.Equal(got, data) {
				t.Fatal("data differs after reopening")
			}
			// Block status shows the stored chunks only.
			m := testserver.Run(t, "nbdinfo", "--map", uri2)
			if !strings.Contains(m, "hole,zero") {
				t.Errorf("nbdinfo --map shows no holes:\n%s", m)
			}
		})
	}
}

// Zero writes, Zero and Trim delete chunk objects; partial zeroing keeps
// the rest of the chunk.
func TestSparse(t *testing.T) {
	g := startGW(t)
	ctx := context.Background()
	const chunk = 64 << 10
	d := g.mustOpen(t, "sparse", "size=1Mi,chunk=64Ki,writeback=0", "n")
	buf := bytes.Repeat([]byte{0xab}, 4*chunk)
	if err := d.WriteAt(ctx, buf, 0, false); err != nil {
		t.Fatal(err)
	}
	if got := g.chunks("sparse"); len(got) != 4 {
		t.Fatalf("chunks after writing 4: %v", got)
	}
	// Zeros written over a whole chunk delete its object.
	if err := d.WriteAt(ctx, make([]byte, chunk), 0, false); err != nil {
		t.Fatal(err)
	}
	// Trim of chunk 1 and half of chunk 2.
	if err := d.Trim(ctx, chunk, chunk+chunk/2, false); err != nil {
		t.Fatal(err)
	}
	// Zero of the second half of chunk 2: now all zero, so deleted too.
	if err := d.Zero(ctx, 2*chunk+chunk/2, chunk/2, 0); err != nil {
		t.Fatal(err)
	}
	if got := g.chunks("sparse"); len(got) != 1 || got[0] != chunkName(3) {
		t.Fatalf("chunks after zeroing: %v, want only %s", got, chunkName(3))
	}
	// A partial zero of a hole creates nothing.
	if err := d.Zero(ctx, 5*chunk+10, 100, backends.ZeroFUA); err != nil {
		t.Fatal(err)
	}
	// Partial zero of chunk 3 keeps the rest.
	if err := d.Zero(ctx, 3*chunk, 10, 0); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 4*chunk)
	copy(want[3*chunk+10:], buf[3*chunk+10:])
	devtest.CheckRead(t, "contents after zeroing", d, 0, want)
	var ext []backends.Extent
	if err := d.Extents(ctx, 0, d.Size(), func(e backends.Extent) { ext = append(ext, e) }); err != nil {
		t.Fatal(err)
	}
	hole := backends.ExtentHole | backends.ExtentZero
	wantExt := []backends.Extent{{Length: 3 * chunk, Flags: hole}, {Length: chunk}, {Length: 12 * chunk, Flags: hole}}
	if fmt.Sprint(ext) != fmt.Sprint(wantExt) {
		t.Fatalf("extents %v, want %v", ext, wantExt)
	}
}

// Many concurrent writes of distinct blocks inside the same chunks (each
// a read-modify-write of the chunk) all land.
func TestConcurrentWritersOneChunk(t *testing.T) {
	g := startGW(t)
	for _, wb := range []string{"writeback=1Mi", "writeback=0"} {
		t.Run(wb, func(t *testing.T) {
			ctx := context.Background()
			prefix := "conc-" + strings.TrimPrefix(wb, "writeback=")
			d, err := g.open(prefix, "size=1Mi,chunk=64Ki,"+wb, "n")
			if err != nil {
				t.Fatal(err)
			}
			// First give the chunks content in the bucket, so every
			// partial write must merge with what is stored.
			base := make([]byte, 256<<10)
			rand.Read(base)
			if err := d.WriteAt(ctx, base, 0, true); err != nil {
				t.Fatal(err)
			}
			const block = 4096
			want := bytes.Clone(base)
			rand.Read(want)
			var wg sync.WaitGroup
			errs := make(chan error, len(want)/block)
			for off := 0; off < len(want); off += block {
				wg.Add(1)
				go func() {
					defer wg.Done()
					errs <- d.WriteAt(ctx, want[off:off+block], uint64(off), off%3 == 0)
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				if err != nil {
					t.Fatal(err)
				}
			}
			if err := d.Flush(ctx); err != nil {
				t.Fatal(err)
			}
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			d2 := g.mustOpen(t, prefix, "", "n")
			got := make([]byte, len(want))
			if err := d2.ReadAt(ctx, got, 0); err != nil {
				t.Fatal(err)
			}
			for off := 0; off < len(want); off += block {
				if sha256.Sum256(got[off:off+block]) != sha256.Sum256(want[off:off+block]) {
					t.Fatalf("block at %d lost", off)
				}
			}
		})
	}
}

// Killing the S3 server under a running volume while writers are busy:
// FUA writes and FLUSH fail with EIO naming the endpoint, a full
// write-back buffer makes writes fail too, and every acknowledged write
// reaches the bucket once the server is back.
func TestServerKilledDuringWrites(t *testing.T) {
	g := startGW(t)
	ctx := context.Background()
	const chunk = 64 << 10
	const size = 8 << 20
	d := g.mustOpen(t, "kill", "size=8Mi,chunk=64Ki,writeback=1Mi,lease-ttl=30s,timeout=1s", "n")
	want := make([]byte, size)
	rand.Read(want)
	// The last chunk goes to the bucket first, for a read later.
	if err := d.WriteAt(ctx, want[size-chunk:], size-chunk, true); err != nil {
		t.Fatal(err)
	}
	// Four writers, each through its own quarter in 16 KiB writes (every
	// fourth one FUA), stopping at their first error. The server is
	// killed once they are under way.
	const writers, block = 4, 16 << 10
	acked := make([]int, writers) // bytes acknowledged from each quarter's start
	errs := make([]error, writers)
	var progress sync.WaitGroup
	progress.Add(writers)
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			base := w * size / writers
			for n := 0; n < size/writers; n += block {
				if n == size/writers/4 {
					progress.Done()
				}
				off := base + n
				if err := d.WriteAt(ctx, want[off:off+block], uint64(off), n%(4*block) == 0); err != nil {
					errs[w] = err
					if n < size/writers/4 {
						progress.Done()
					}
					return
				}
				acked[w] = n + block
			}
		}()
	}
	progress.Wait()
	g.Stop()
	wg.Wait()
	for w, err := range errs {
		t.Logf("writer %d: %d bytes acknowledged, then %v", w, acked[w], err)
		if err == nil {
			t.Errorf("writer %d never failed with the server down", w)
		} else if !errors.Is(err, syscall.EIO) {
			t.Errorf("writer %d: %v is not EIO", w, err)
		}
	}
	// Nothing claims to be durable while the server is away.
	ferr := d.Flush(ctx)
	if ferr == nil || !errors.Is(ferr, syscall.EIO) || !strings.Contains(ferr.Error(), g.Endpoint()) {
		t.Fatalf("flush with the server down: %v; want EIO naming %s", ferr, g.Endpoint())
	}
	// (at 7Mi: past what the writers got to, so it spoils no acked data)
	fuaErr := d.WriteAt(ctx, want[7<<20:7<<20+100], 7<<20, true)
	if fuaErr == nil || !errors.Is(fuaErr, syscall.EIO) {
		t.Fatalf("FUA write with the server down: %v; want EIO", fuaErr)
	}
	// Reads of chunks in the bucket (not in memory) fail too, naming it.
	if err := d.ReadAt(ctx, make([]byte, 100), size-100); err == nil || !strings.Contains(err.Error(), "s3://"+bucketName+"/kill/") {
		t.Fatalf("read with the server down: %v", err)
	}
	g.Restart()
	if err := d.Flush(ctx); err != nil {
		t.Fatalf("flush after the server came back: %v", err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	d2 := g.mustOpen(t, "kill", "", "n")
	got := make([]byte, size)
	if err := d2.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	for w := range writers {
		base := w * size / writers
		if !bytes.Equal(got[base:base+acked[w]], want[base:base+acked[w]]) {
			t.Errorf("writer %d: acknowledged writes were lost", w)
		}
	}
}

func TestLease(t *testing.T) {
	g := startGW(t)
	ctx := context.Background()
	a := g.mustOpen(t, "leased", "size=1Mi,chunk=64Ki", "node-a")
	// A second writer elsewhere is refused, naming the holder.
	_, err := g.open("leased", "", "node-b")
	if !errors.Is(err, ErrLeased) || !strings.Contains(err.Error(), `"node-a"`) {
		t.Fatalf("second writer: %v; want ErrLeased naming node-a", err)
	}
	// So is a second writer in this process, even with the same owner.
	if _, err := g.open("leased", "", "node-a"); !errors.Is(err, ErrLeased) {
		t.Fatalf("second open in-process: %v", err)
	}
	// Readers need no lease.
	r := g.mustOpen(t, "leased", "readonly=true", "node-b")
	devtest.CheckReadOnly(t, r)
	// Deleting a volume in use is refused too.
	if err := Delete(ctx, g.spec("leased", ""), g.env("controller")); !errors.Is(err, ErrLeased) {
		t.Fatalf("delete while leased: %v", err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	// Released: node-b takes it.
	b, err := g.open("leased", "", "node-b")
	if err != nil {
		t.Fatalf("after release: %v", err)
	}
	// node-b "crashes" (its lease stays, as after a crash); node-b
	// restarted takes its own lease back, node-a still cannot.
	crash(b)
	if _, err := g.open("leased", "", "node-a"); !errors.Is(err, ErrLeased) {
		t.Fatalf("node-a while node-b's lease is live: %v", err)
	}
	b2 := g.mustOpen(t, "leased", "", "node-b")
	if err := b2.WriteAt(ctx, []byte{7}, 0, true); err != nil {
		t.Fatal(err)
	}
}

// A writer whose lease was taken over (it lapsed) stops writing.
func TestLeaseLost(t *testing.T) {
	g := startGW(t)
	ctx := context.Background()
	d := g.mustOpen(t, "lost", "size=1Mi,chunk=64Ki,lease-ttl=1s,writeback=0", "node-a")
	if err := d.WriteAt(ctx, []byte{1}, 0, false); err != nil {
		t.Fatal(err)
	}
	// Someone else writes the lease object, as a new holder would after
	// ours lapsed.
	body := fmt.Sprintf(`{"owner":"node-z","expires":%q}`, time.Now().Add(time.Hour).UTC().Format(time.RFC3339))
	_, err := g.Client().PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String(bucketName),
		Key: aws.String("lost/" + leaseName), Body: strings.NewReader(body)})
	if err != nil {
		t.Fatal(err)
	}
	// The next renewal notices; from then on writes fail.
	deadline := time.Now().Add(20 * time.Second)
	for d.lease.check() == nil && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	err = d.WriteAt(ctx, []byte{2}, 0, false)
	if !errors.Is(err, ErrLeased) || !strings.Contains(err.Error(), "node-z") || !errors.Is(err, syscall.EIO) {
		t.Fatalf("write after losing the lease: %v", err)
	}
}

func TestMetaMismatch(t *testing.T) {
	g := startGW(t)
	d := g.mustOpen(t, "meta", "size=4Mi,chunk=64Ki", "n")
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	for opts, want := range map[string]string{
		"size=4Mi,chunk=128Ki": `option "chunk"`,
		"size=8Mi,chunk=64Ki":  `option "size"`,
		"size=4Mi,chunk=4Mi":   `option "chunk"`, // the default, given explicitly
	} {
		_, err := g.open("meta", opts, "n")
		if !errors.Is(err, ErrExists) || !strings.Contains(err.Error(), want) {
			t.Errorf("open with %s: %v; want ErrExists naming %s", opts, err, want)
		}
	}
	// A smaller or absent size opens the volume at its real size.
	for _, opts := range []string{"size=1Mi,chunk=64Ki", "chunk=64Ki", ""} {
		d, err := g.open("meta", opts, "n")
		if err != nil {
			t.Fatalf("open with %s: %v", opts, err)
		}
		if d.Size() != 4<<20 {
			t.Errorf("open with %s: size %d, want 4Mi", opts, d.Size())
		}
		d.Close()
	}
	// No volume yet: creating one needs a size; reading one needs one.
	if _, err := g.open("nometa", "", "n"); err == nil || !strings.Contains(err.Error(), `option "size"`) {
		t.Errorf("create without size: %v", err)
	}
	if _, err := g.open("nometa", "readonly=true", "n"); !errors.Is(err, ErrNotFound) {
		t.Errorf("read-only open of nothing: %v", err)
	}
	// A metadata object from a future format is refused.
	_, err := g.Client().PutObject(context.Background(), &s3.PutObjectInput{Bucket: aws.String(bucketName),
		Key: aws.String("future/" + metaName), Body: strings.NewReader(`{"format":9,"size":65536,"chunkSize":65536}`)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := g.open("future", "", "n"); err == nil || !strings.Contains(err.Error(), "format version 9") {
		t.Errorf("future format: %v", err)
	}
}

func TestUnreachableAndMissingBucket(t *testing.T) {
	g := startGW(t)
	ctx := context.Background()
	// A port nobody listens on.
	dead := "http://" + testserver.Addr(testserver.FreePort(t))
	s, err := backends.Parse("endpoint=" + dead + ",path-style=true,timeout=2s,size=1Mi;s3://nowhere/vol")
	if err != nil {
		t.Fatal(err)
	}
	_, err = Open(ctx, s, g.env("n"))
	if err == nil || !strings.Contains(err.Error(), dead) || !strings.Contains(err.Error(), "s3://nowhere/vol") {
		t.Fatalf("unreachable endpoint: %v; want an error naming %s and the volume", err, dead)
	}
	s, err = backends.Parse("endpoint=" + g.Endpoint() + ",path-style=true,size=1Mi;s3://nosuchbucket/vol")
	if err != nil {
		t.Fatal(err)
	}
	_, err = Open(ctx, s, g.env("n"))
	if !errors.Is(err, ErrNoBucket) || !strings.Contains(err.Error(), `"nosuchbucket"`) {
		t.Fatalf("missing bucket: %v", err)
	}
	// Wrong credentials are named as such, and never shown.
	env := g.env("n")
	env.Secrets = map[string]string{"access-key-id": "wrong", "secret-access-key": "sekrit-value"}
	_, err = Open(ctx, g.spec("vol", "size=1Mi"), env)
	if err == nil || !strings.Contains(err.Error(), "access denied") || strings.Contains(err.Error(), "sekrit-value") {
		t.Fatalf("bad credentials: %v", err)
	}
}

func TestAdminLifecycle(t *testing.T) {
	g := startGW(t)
	ctx := context.Background()
	env := g.env("controller")
	spec := g.spec("pvc-1", "size=1Mi,chunk=64Ki")
	if ok, err := Exists(ctx, spec, env); ok || err != nil {
		t.Fatalf("Exists before create = %v, %v", ok, err)
	}
	if err := Create(ctx, spec, env); err != nil {
		t.Fatal(err)
	}
	if err := Create(ctx, spec, env); err != nil {
		t.Fatalf("create again: %v", err)
	}
	if ok, err := Exists(ctx, spec, env); !ok || err != nil {
		t.Fatalf("Exists after create = %v, %v", ok, err)
	}
	if err := Create(ctx, g.spec("pvc-1", "size=2Mi,chunk=64Ki"), env); !errors.Is(err, ErrExists) {
		t.Fatalf("create with another size: %v", err)
	}
	// Write some data through a device, then expand behind its back.
	d, err := Open(ctx, spec, g.env("node-a"))
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 300<<10)
	rand.Read(data)
	if err := d.WriteAt(ctx, data, 100, false); err != nil {
		t.Fatal(err)
	}
	if err := Expand(ctx, spec, env, 3<<20); err != nil {
		t.Fatal(err)
	}
	if err := Expand(ctx, spec, env, 3<<20); err != nil {
		t.Fatalf("expand again: %v", err)
	}
	if err := Expand(ctx, spec, env, 2<<20); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("shrink: %v", err)
	}
	if err := backends.Resize(ctx, d, 3<<20); err != nil || d.Size() != 3<<20 {
		t.Fatalf("resize to the expanded size: %v, size %d", err, d.Size())
	}
	// The device grows the metadata itself too.
	if err := backends.Resize(ctx, d, 4<<20); err != nil {
		t.Fatal(err)
	}
	if err := d.WriteAt(ctx, data[:10], 4<<20-10, false); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	// Snapshot: a server-side copy, readable as a volume of its own.
	if err := Snapshot(ctx, spec, "snap-1", env); err != nil {
		t.Fatal(err)
	}
	if err := Snapshot(ctx, spec, "snap-1", env); err != nil {
		t.Fatalf("snapshot again: %v", err)
	}
	snap := g.mustOpen(t, "snap-1", "readonly=true,chunk=64Ki", "")
	if snap.Size() != 4<<20 {
		t.Fatalf("snapshot size %d", snap.Size())
	}
	got := make([]byte, len(data))
	if err := snap.ReadAt(ctx, got, 100); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("snapshot data differs (%v)", err)
	}
	// A new, larger volume from the snapshot.
	clone := g.spec("pvc-2", "size=8Mi,chunk=64Ki")
	if err := CopyFrom(ctx, clone, g.spec("snap-1", "chunk=64Ki"), env); err != nil {
		t.Fatal(err)
	}
	if err := CopyFrom(ctx, clone, g.spec("snap-1", "chunk=64Ki"), env); err != nil {
		t.Fatalf("copy again: %v", err)
	}
	if err := CopyFrom(ctx, g.spec("pvc-3", "chunk=128Ki"), g.spec("snap-1", "chunk=64Ki"), env); err == nil ||
		!strings.Contains(err.Error(), `option "chunk"`) {
		t.Fatalf("copy with another chunk size: %v", err)
	}
	c := g.mustOpen(t, "pvc-2", "chunk=64Ki", "node-b")
	if c.Size() != 8<<20 {
		t.Fatalf("clone size %d", c.Size())
	}
	if err := c.ReadAt(ctx, got, 100); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("clone data differs (%v)", err)
	}
	// Writes to the clone leave the snapshot alone.
	if err := c.WriteAt(ctx, make([]byte, 64<<10), 0, true); err != nil {
		t.Fatal(err)
	}
	if err := snap.ReadAt(ctx, got, 100); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("snapshot changed by a write to its clone (%v)", err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	// Delete removes every object, and again is fine.
	for _, p := range []string{"pvc-1", "pvc-2", "snap-1"} {
		if err := Delete(ctx, g.spec(p, ""), env); err != nil {
			t.Fatal(err)
		}
		if err := Delete(ctx, g.spec(p, ""), env); err != nil {
			t.Fatalf("delete again: %v", err)
		}
	}
	if keys, err := g.Keys(bucketName, ""); err != nil || len(keys) != 0 {
		t.Fatalf("left after delete: %v (%v)", keys, err)
	}
	if err := Expand(ctx, spec, env, 8<<20); !errors.Is(err, ErrNotFound) {
		t.Fatalf("expand a deleted volume: %v", err)
	}
	if ok, err := Exists(ctx, spec, env); ok || err != nil {
		t.Fatalf("Exists after delete = %v, %v", ok, err)
	}
}

// crash stops d's background work without flushing or releasing its
// lease, as if its process had died.
func crash(d *Device) {
	close(d.stop)
	<-d.flusher
	close(d.lease.stop)
	<-d.lease.done
	d.unregister()
	d.closed.Store(true)
}

// Block status counts chunks still in the write-back buffer as data: a
// client copying the volume (nbdcopy skips holes) must not miss them.
func TestExtentsSeeUnflushedWrites(t *testing.T) {
	g := startGW(t)
	ctx := context.Background()
	const chunk = 64 << 10
	d := g.mustOpen(t, "unflushed", "size=1Mi,chunk=64Ki,writeback=1Mi", "n")
	if err := d.WriteAt(ctx, []byte{1}, 5*chunk+7, false); err != nil {
		t.Fatal(err)
	}
	var ext []backends.Extent
	if err := d.Extents(ctx, 0, d.Size(), func(e backends.Extent) { ext = append(ext, e) }); err != nil {
		t.Fatal(err)
	}
	hole := backends.ExtentHole | backends.ExtentZero
	want := []backends.Extent{{Length: 5 * chunk, Flags: hole}, {Length: chunk}, {Length: 10 * chunk, Flags: hole}}
	if fmt.Sprint(ext) != fmt.Sprint(want) {
		t.Fatalf("extents %v, want %v", ext, want)
	}
	if err := d.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if got := g.chunks("unflushed"); len(got) != 1 || got[0] != chunkName(5) {
		t.Fatalf("after flush: %v", got)
	}
}

// An https endpoint with a private CA (option ca): data goes through, and
// without the CA the certificate is refused, clearly.
func TestHTTPSEndpoint(t *testing.T) {
	ca := testpki.NewCA(t, "s3 test CA")
	v := testserver.StartVersitygwTLS(t, ca)
	v.CreateBucket(bucketName)
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(caFile, ca.PEM, 0o600); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	env := backends.Env{Secrets: v.Secrets(), Owner: "n"}
	spec := func(opts string) backends.Spec {
		s, err := backends.Parse(opts + "endpoint=" + v.Endpoint() + ",path-style=true,size=1Mi,chunk=64Ki,timeout=5s;s3://" + bucketName + "/tls")
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	if _, err := Open(ctx, spec(""), env); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("open without the CA: %v; want a certificate error", err)
	}
	d, err := Open(ctx, spec("ca="+caFile+","), env)
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 200<<10)
	rand.Read(data)
	if err := d.WriteAt(ctx, data, 1000, true); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	d, err = Open(ctx, spec("ca="+caFile+",readonly=true,"), env)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	got := make([]byte, len(data))
	if err := d.ReadAt(ctx, got, 1000); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back over https: %v", err)
	}
	if _, err := Open(ctx, spec("ca="+filepath.Join(t.TempDir(), "none.pem")+","), env); err == nil || !strings.Contains(err.Error(), `option "ca"`) {
		t.Fatalf("missing CA file: %v", err)
	}
}

// The write-back buffer lives in memory: Caps says so (attach.Manager then
// refuses to re-serve the volume after its process died), and only then.
func TestCapsBufferedWrites(t *testing.T) {
	g := startGW(t)
	for opts, want := range map[string]bool{
		"size=1Mi,chunk=64Ki":             true,
		"size=1Mi,chunk=64Ki,writeback=0": false,
	} {
		if got := g.mustOpen(t, "caps-"+strings.ReplaceAll(opts, ",", "-"), opts, "n").Caps().BufferedWrites; got != want {
			t.Errorf("%s: BufferedWrites %v, want %v", opts, got, want)
		}
	}
}
