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

fill() {
	# Fill the volume once so reads hit allocated data on both servers.
	fio --name=fill --filename=$2 --direct=1 --ioengine=libaio --rw=write --bs=1M --iodepth=8 --size=128M >/dev/null 2>/tmp/fill.err || fail "fio fill on $1"
}

run() {
	local target=$1 dev=$2 name=$3
	shift 3
	line=$(fio --name=$name --filename=$dev --direct=1 --ioengine=libaio --size=128M \
		--runtime=${BENCH_SECONDS:-5} --time_based --output-format=terse "$@" 2>/tmp/fio.err) || fail "fio $name on $target"
	echo "VMBENCH $target $name $line"
}

csi-nbd attach --state-dir /run/bench "size=512Mi;memory:bench" >/tmp/ours.out 2>/tmp/ours.err &
ours=$!
dev=$(first_line /tmp/ours.out 60) || fail "csi-nbd attach printed no device"
nbdkit -U /tmp/nbdkit.sock -f memory 512M >/tmp/nbdkit.out 2>/tmp/nbdkit.err &
kit=$!
i=0
while [ ! -S /tmp/nbdkit.sock ]; do i=$((i + 1)); [ $i -gt 300 ] && fail "nbdkit did not start"; sleep 0.1; done
theirs=/dev/nbd$(( ${dev#/dev/nbd} + 1 ))
nbd-client -u /tmp/nbdkit.sock $theirs -N '' >/tmp/nbdclient.out 2>/tmp/nbdclient.err || fail "nbd-client"
fill csi-nbd $dev
fill nbdkit+nbd-client $theirs
# Alternate the two, twice, so a busy host slows both alike; the test
# keeps the better run of each.
for round in 1 2; do
	for job in "randread-4k-qd1 --rw=randread --bs=4k --iodepth=1" \
		"randread-4k-qd32 --rw=randread --bs=4k --iodepth=32" \
		"randwrite-4k-qd32 --rw=randwrite --bs=4k --iodepth=32" \
		"write-1m-qd8 --rw=write --bs=1M --iodepth=8"; do
		run csi-nbd $dev $job
		run nbdkit+nbd-client $theirs $job
	done
done
echo "VMTEST: benchmark done, tearing down"
timeout 60 csi-nbd detach --state-dir /run/bench $dev || fail "csi-nbd detach"
i=0
while kill -0 $ours 2>/dev/null; do
	i=$((i + 1))
	if [ $i -gt 300 ]; then
		for t in /proc/$ours/task/*; do
			echo "thread $t: $(cut -d' ' -f3 $t/stat) wchan $(cat $t/wchan)"
			cat $t/stack 2>/dev/null | head -n 12
		done
		fail "csi-nbd attach still running 30 s after its device was detached"
	fi
	sleep 0.1
done
timeout 60 nbd-client -d $theirs >/dev/null 2>&1 || fail "nbd-client -d"
kill $kit

echo "VMTEST PASS"
poweroff -f
sleep 60
