#!/bin/busybox sh
# /init of the benchmark VM: the same fio jobs on a memory volume attached
# by csi-nbd attach and on nbdkit's memory plugin attached by nbd-client.
# Prints "VMBENCH <target> <job> <fio terse line>".
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
ip link set lo up

fail() {
	echo "VMTEST FAIL: $*"
	for f in /tmp/*.err; do [ -s "$f" ] && { echo "--- $f"; tail -n 20 "$f"; }; done
	dmesg | tail -n 20
	poweroff -f
	sleep 60
}
first_line() {
	i=0
	while [ ! -s "$1" ]; do
		i=$((i + 1))
		[ $i -gt $(($2 * 10)) ] && return 1
		sleep 0.1
	done
	head -n 1 "$1"
}
depmod && modprobe nbd || fail "modprobe nbd"

jobs() {
	target=$1 dev=$2
	# Fill the volume once so reads hit allocated data on both servers.
	fio --name=fill --filename=$dev --direct=1 --ioengine=libaio --rw=write --bs=1M --iodepth=8 --size=256M >/dev/null 2>/tmp/fill.err || fail "fio fill on $target"
	for job in "randread-4k-qd1 --rw=randread --bs=4k --iodepth=1" \
		"randread-4k-qd32 --rw=randread --bs=4k --iodepth=32" \
		"randwrite-4k-qd32 --rw=randwrite --bs=4k --iodepth=32" \
		"write-1m-qd8 --rw=write --bs=1M --iodepth=8"; do
		set -- $job
		name=$1
		shift
		line=$(fio --name=$name --filename=$dev --direct=1 --ioengine=libaio --size=256M \
			--runtime=${BENCH_SECONDS:-5} --time_based --output-format=terse "$@" 2>/tmp/fio.err) || fail "fio $name on $target"
		echo "VMBENCH $target $name $line"
	done
}

csi-nbd attach --state-dir /run/bench "size=1Gi;memory:bench" >/tmp/ours.out 2>/tmp/ours.err &
ours=$!
dev=$(first_line /tmp/ours.out 60) || fail "csi-nbd attach printed no device"
jobs csi-nbd $dev
csi-nbd detach --state-dir /run/bench $dev || fail "detach"
wait $ours

nbdkit -U /tmp/nbdkit.sock -f memory 1G >/tmp/nbdkit.out 2>/tmp/nbdkit.err &
kit=$!
i=0
while [ ! -S /tmp/nbdkit.sock ]; do i=$((i + 1)); [ $i -gt 300 ] && fail "nbdkit did not start"; sleep 0.1; done
nbd-client -u /tmp/nbdkit.sock /dev/nbd1 -N '' >/tmp/nbdclient.out 2>/tmp/nbdclient.err || fail "nbd-client"
jobs nbdkit+nbd-client /dev/nbd1
nbd-client -d /dev/nbd1 >/dev/null 2>&1
kill $kit

echo "VMTEST PASS"
poweroff -f
sleep 60
