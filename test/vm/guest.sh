#!/bin/busybox sh
# /init of the test VM: exercises csi-nbd attach against the real nbd
# driver. Prints "VMTEST: ..." progress, "VMTEST FAIL: ..." on failure and
# "VMTEST PASS" at the end, then powers off.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run

log() { echo "VMTEST: $*"; }
fail() {
	echo "VMTEST FAIL: $*"
	for f in /tmp/*.err; do [ -s "$f" ] && { echo "--- $f"; tail -n 20 "$f"; }; done
	dmesg | tail -n 40
	poweroff -f
	sleep 60
}
uptime_ms() { awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime; }

# first_line FILE SECONDS: wait for a process to print its first line.
first_line() {
	i=0
	while [ ! -s "$1" ]; do
		i=$((i + 1))
		[ $i -gt $(($2 * 10)) ] && return 1
		sleep 0.1
	done
	head -n 1 "$1"
}

# Every serving thread must carry PF_MEMALLOC_NOIO (PR_SET_IO_FLUSHER).
check_io_flusher() {
	for s in /proc/$1/task/*/stat; do
		flags=$(sed 's/.*) //' "$s" | cut -d' ' -f7)
		[ $((flags & 0x80000)) -ne 0 ] || fail "thread $s of pid $1 is not an I/O flusher (flags $flags)"
	done
}

depmod || fail "depmod"
modprobe crc32c_generic && modprobe ext4 || fail "loading ext4"
lsmod | grep -q '^nbd' && fail "nbd loaded before csi-nbd attach asked for it"
log "booted $(uname -r), uptime $(uptime_ms) ms"

memory_volume() {
	n=$1
	st=/run/mem$n
	csi-nbd attach --state-dir $st --connections $n "size=256Mi;memory:mem$n" >/tmp/mem$n.out 2>/tmp/mem$n.err &
	pid=$!
	dev=$(first_line /tmp/mem$n.out 60) || fail "attach of a memory volume with $n connections printed no device"
	[ -b "$dev" ] || fail "$dev is not a block device"
	check_io_flusher $pid
	q=/sys/block/${dev#/dev/}/queue
	log "memory, $n connection(s): $dev, scheduler $(cat $q/scheduler), rotational $(cat $q/rotational), hw queues $(ls $q/../mq | wc -l) (the kernel caps them at the CPU count), backend $(cat /sys/block/${dev#/dev/}/backend)"
	
	mkfs.ext4 -q -F "$dev" || fail "mkfs.ext4 $dev"
	mount "$dev" /mnt || fail "mount $dev"
	dd if=/dev/urandom of=/tmp/blob bs=1M count=24 2>/dev/null
	want=$(sha256sum </tmp/blob)
	cp /tmp/blob /mnt/blob && sync || fail "write to $dev"
	umount /mnt || fail "umount"
	echo 3 >/proc/sys/vm/drop_caches
	mount "$dev" /mnt || fail "remount $dev"
	[ "$(sha256sum </mnt/blob)" = "$want" ] || fail "checksum after remount differs ($n connections)"
	rm /mnt/blob
	fstrim -v /mnt >/tmp/fstrim.out 2>&1 || { cat /tmp/fstrim.out; fail "fstrim"; }
	log "memory, $n connection(s): $(cat /tmp/fstrim.out)"
	sync
	umount /mnt || fail "umount"
	csi-nbd detach --state-dir $st "$dev" 2>/tmp/detach$n.err || fail "csi-nbd detach $dev"
	wait $pid || fail "csi-nbd attach exited with status $? after detach"
	ls $st/volumes/*.json >/dev/null 2>&1 && fail "the record of $dev outlived its detach"
	[ "$(cat /sys/block/${dev#/dev/}/size)" = 0 ] || fail "$dev still has a size after detach"
	log "memory, $n connection(s): mkfs, mount, write, verify, trim, detach ok"
}

memory_volume 1
memory_volume 4

# The restart: a file volume (it outlives its server), a writer that
# fsyncs every file, the server SIGKILLed in the middle, re-served by
# --resume. The writer must see no error and every file must verify.
st=/run/file
csi-nbd attach --state-dir $st --connections 2 --timeout 30s --dead-conn-timeout 90s \
	"size=384Mi;file:///tmp/volume.img" >/tmp/file1.out 2>/tmp/file1.err &
pid=$!
dev=$(first_line /tmp/file1.out 60) || fail "attach of a file volume printed no device"
mkfs.ext4 -q -F "$dev" || fail "mkfs.ext4 $dev"
mount "$dev" /mnt || fail "mount $dev"
: >/tmp/sums
# wait_files N: until the writer has written N files in all.
wait_files() {
	while [ "$(wc -l </tmp/sums)" -lt $1 ]; do sleep 0.05; done
}
# writer N PREFIX: N files of 512 KiB, each fsynced; counts failures.
writer() {
	errors=0
	i=0
	rm -f /tmp/writer.result
	while [ $i -lt $1 ]; do
		i=$((i + 1))
		dd if=/dev/urandom of=/tmp/src bs=64k count=8 2>/dev/null
		if ! dd if=/tmp/src of=/mnt/$2$i bs=64k conv=fsync 2>/tmp/dd.err; then
			errors=$((errors + 1))
			cat /tmp/dd.err
		fi
		echo "$(sha256sum </tmp/src | cut -d' ' -f1)  /mnt/$2$i" >>/tmp/sums
	done
	echo $errors >/tmp/writer.result
}
writer 80 f &
writer=$!
wait_files 10
[ -e /tmp/writer.result ] && fail "the writer finished before the kill: the test would prove nothing"
kill -9 $pid
killed=$(uptime_ms)
log "serving process $pid killed after $(wc -l </tmp/sums) of 80 files"
csi-nbd attach --resume --state-dir $st >/tmp/file2.out 2>/tmp/file2.err &
pid2=$!
dev2=$(first_line /tmp/file2.out 60) || fail "attach --resume printed no device"
served=$(uptime_ms)
[ "$dev2" = "$dev" ] || fail "resume served $dev2, want $dev"
check_io_flusher $pid2
log "re-served $dev $((served - killed)) ms after the kill (process start to RECONFIGURE: $(grep -o 're-served [0-9].*' /tmp/file2.err))"
wait $writer
errors=$(cat /tmp/writer.result)
[ "$errors" = 0 ] || fail "the writer saw $errors I/O errors across the restart"
umount /mnt || fail "umount after restart"
echo 3 >/proc/sys/vm/drop_caches
mount "$dev" /mnt || fail "remount after restart"
sha256sum -c /tmp/sums >/tmp/sumcheck 2>&1 || { grep -v OK /tmp/sumcheck; fail "checksums differ after the restart"; }
log "restart: $(wc -l </tmp/sums) files written through a SIGKILL of the server, zero I/O errors, all verified after remount"

# Hand-over: SIGUSR1 stops serving without detaching (an upgrade), the
# next process resumes; again mid-write, again no error.
writer 60 g &
writer=$!
wait_files 90
[ -e /tmp/writer.result ] && fail "the writer finished before the hand-over"
kill -USR1 $pid2
wait $pid2 || fail "csi-nbd attach exited with status $? on SIGUSR1"
stopped=$(uptime_ms)
csi-nbd attach --resume --state-dir $st >/tmp/file3.out 2>/tmp/file3.err &
pid3=$!
dev3=$(first_line /tmp/file3.out 60) || fail "attach --resume after the hand-over printed no device"
[ "$dev3" = "$dev" ] || fail "hand-over served $dev3, want $dev"
log "hand-over: $dev re-served $(($(uptime_ms) - stopped)) ms after the old server stopped"
wait $writer
[ "$(cat /tmp/writer.result)" = 0 ] || fail "the writer saw $(cat /tmp/writer.result) I/O errors across the hand-over"
umount /mnt && mount "$dev" /mnt || fail "remount after the hand-over"
sha256sum -c /tmp/sums >/tmp/sumcheck 2>&1 || { grep -v OK /tmp/sumcheck; fail "checksums differ after the hand-over"; }
log "hand-over: $(wc -l </tmp/sums) files verified"
umount /mnt
dmesg | grep -E "I/O error|EXT4-fs error|Aborting journal" && fail "the kernel reported I/O errors"
csi-nbd detach --state-dir $st "$dev" || fail "detach after restart"
wait $pid3 || fail "resumed csi-nbd attach exited with status $?"

# Memory pressure: tmpfs pins most of the RAM (no swap), then a writer
# dirties the page cache on an nbd volume; reclaim must write those pages
# back through our server, which needs memory to take them. With the
# serving threads marked PR_SET_IO_FLUSHER the writer finishes.
st=/run/pressure
csi-nbd attach --state-dir $st "size=512Mi;memory:pressure" >/tmp/pressure.out 2>/tmp/pressure.err &
pid=$!
dev=$(first_line /tmp/pressure.out 60) || fail "attach for the memory pressure test printed no device"
echo -1000 >/proc/$pid/oom_score_adj
mkfs.ext4 -q -F "$dev" && mount "$dev" /mnt || fail "mkfs/mount for the memory pressure test"
total=$(awk '/MemTotal/ { print int($2 / 1024) }' /proc/meminfo)
avail=$(awk '/MemAvailable/ { print int($2 / 1024) }' /proc/meminfo)
hog=$((avail - 200))
mkdir -p /hog && mount -t tmpfs -o size=${hog}m hog /hog
dd if=/dev/zero of=/hog/pin bs=1M count=$hog 2>/dev/null
log "memory pressure: ${total} MiB RAM, ${hog} MiB pinned in tmpfs, $(awk '/MemAvailable/ { print int($2 / 1024) }' /proc/meminfo) MiB left"
start=$(uptime_ms)
timeout 300 dd if=/dev/urandom of=/mnt/dirty bs=1M count=160 2>/tmp/dirty.err || fail "writer under memory pressure failed or hung: $(cat /tmp/dirty.err)"
timeout 300 sync || fail "sync under memory pressure hung"
log "memory pressure: 160 MiB written and synced in $(($(uptime_ms) - start)) ms; $(grep -E '^(pgsteal_kswapd|pgsteal_direct|allocstall_normal|oom_kill) ' /proc/vmstat | tr '\n' ' ')"
umount /mnt || fail "umount after the memory pressure test"
umount /hog
csi-nbd detach --state-dir $st "$dev" || fail "detach after the memory pressure test"
wait $pid || fail "csi-nbd attach exited with status $? after the memory pressure test"

# csi-sanity against `csi-nbd all` with kernel attach only (no fallback):
# every NodeStage goes through netlink CONNECT, mkfs, blkid, mount; every
# NodeExpand through a live resize and resize2fs. One driver serves the
# mount and the block runs; util-linux and e2fsprogs come first on its
# PATH (mount-utils wants their options, busybox lacks some).
sanity() {
	access=$1
	start=$(uptime_ms)
	csi-sanity -csi.endpoint unix:///tmp/csi.sock -csi.mountdir /tmp/sanity/target -csi.stagingdir /tmp/sanity/staging \
		-csi.testvolumeaccesstype "$access" -csi.testvolumesize 67108864 -csi.testvolumeexpandsize 134217728 \
		-ginkgo.no-color -ginkgo.timeout 5m >/tmp/sanity-$access.out 2>&1
	rc=$?
	ran=$(grep -E '^Ran [0-9]+ of [0-9]+ Specs' /tmp/sanity-$access.out)
	counts=$(grep -oE '[0-9]+ Passed \| [0-9]+ Failed \| [0-9]+ Pending \| [0-9]+ Skipped' /tmp/sanity-$access.out)
	log "csi-sanity $access: $ran; $counts; $(($(uptime_ms) - start)) ms"
	if [ $rc != 0 ] || [ -z "$counts" ]; then
		grep -E '^[[:space:]]*\[(FAIL|FAILED|PANICKED|TIMEDOUT)\]' /tmp/sanity-$access.out | sed 's/^/VMTEST: /'
		tail -n 60 /tmp/sanity-$access.out
		tail -n 40 /tmp/csi-driver.err
		fail "csi-sanity $access (exit status $rc)"
	fi
}
if [ -x /bin/csi-sanity ]; then
	mkdir -p /tmp/sanity
	PATH=/usr/sbin:/usr/bin:/sbin:/bin csi-nbd all --endpoint unix:///tmp/csi.sock --node-id vm --state-dir /tmp/csi \
		--backends memory --fallback never -v 2 >/tmp/csi-driver.out 2>/tmp/csi-driver.log &
	drv=$!
	i=0
	while [ ! -S /tmp/csi.sock ]; do
		i=$((i + 1))
		[ $i -gt 600 ] && { cp /tmp/csi-driver.log /tmp/csi-driver.err; fail "csi-nbd all did not create its socket"; }
		sleep 0.1
	done
	sanity mount
	# The specs cannot see the filesystem: mount-utils skips resize2fs
	# quietly when blkid finds no filesystem, so ask the driver's log.
	grep -q 'Disk successfully formatted' /tmp/csi-driver.log || fail "csi-sanity mount formatted no volume"
	grep -q 'resized successfully' /tmp/csi-driver.log || fail "csi-sanity mount grew no filesystem (no resize2fs ran)"
	dmesg | grep -q 'nbd[0-9]*: detected capacity change from 131072 to 262144' || fail "the kernel saw no nbd device grow from 64 to 128 MiB during csi-sanity"
	sanity block
	left=$(ls /tmp/csi/attach/volumes/ 2>/dev/null | grep -c '\.json$')
	[ "$left" = 0 ] || fail "$left attach records left after csi-sanity deleted its volumes"
	for s in /sys/block/nbd*/size; do
		[ "$(cat $s)" = 0 ] || fail "${s%/size} still attached after csi-sanity"
	done
	grep -q ' /tmp/sanity/' /proc/mounts && fail "mounts left under /tmp/sanity: $(grep ' /tmp/sanity/' /proc/mounts)"
	kill $drv
	wait $drv || { cp /tmp/csi-driver.log /tmp/csi-driver.err; fail "csi-nbd all exited with status $? on SIGTERM"; }
fi

if [ -x /bin/attach.test ]; then
	CSI_NBD_KERNEL_TEST=1 /bin/attach.test -test.run "Kernel|IOFlusher" -test.v >/tmp/gotest.out 2>&1 || { cat /tmp/gotest.out; fail "go tests against the kernel"; }
	grep -E '^(---|ok|PASS)|VMLOG' /tmp/gotest.out | sed 's/^/VMTEST: go: /'
fi

echo "VMTEST PASS"
poweroff -f
sleep 60
