package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// bootSector prints msg on the first serial port and halts: a whole
// bootable disk small enough to live in an export name.
func bootSector(msg string) []byte {
	code := []byte{
		0xFC,       // cld
		0x31, 0xC0, // xor ax, ax
		0x8E, 0xD8, // mov ds, ax
		0xBA, 0xF8, 0x03, // mov dx, 0x3f8 (COM1)
		0xBE, 0x15, 0x7C, // mov si, 0x7c15 (msg)
		0xAC,       // next: lodsb
		0x08, 0xC0, // or al, al
		0x74, 0x03, // jz done
		0xEE,       // out dx, al
		0xEB, 0xF8, // jmp next
		0xFA, 0xF4, // done: cli; hlt
	}
	b := append(code, msg...)
	b = append(b, 0)
	b = append(b, make([]byte, 510-len(b))...)
	return append(b, 0x55, 0xAA)
}

// qemu boots straight from a data: export holding the boot sector.
func TestServeBootsQemuFromDataExport(t *testing.T) {
	requireTool(t, "qemu-system-x86_64")
	const msg = "csi-nbd: booted over NBD\r\n"
	spec := "data:;base64," + base64.StdEncoding.EncodeToString(bootSector(msg))
	sock := startServe(t, spec)

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64", "-nodefaults", "-display", "none",
		"-serial", "stdio", "-m", "32", "-boot", "a",
		"-drive", "file=nbd:unix:"+sock+",format=raw,if=floppy,readonly=on")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	booted := make(chan struct{})
	var seen strings.Builder
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := stdout.Read(buf)
			seen.Write(buf[:n])
			if strings.Contains(seen.String(), msg) {
				close(booted)
				return
			}
			if err != nil {
				return
			}
		}
	}()
	select {
	case <-booted:
	case <-ctx.Done():
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("qemu did not boot from the export in time: %s", stderr.String())
	}
}
