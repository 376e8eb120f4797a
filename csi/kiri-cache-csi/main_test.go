package main

import (
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	csi "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func newDriver(t *testing.T) *driver {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("the driver chowns: run as root")
	}
	return &driver{root: t.TempDir(), nodeID: "n1", uid: 65532, gid: 65532}
}

func owner(t *testing.T, path string) (int, int, os.FileMode) {
	t.Helper()
	st, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	sys := st.Sys().(*syscall.Stat_t)
	return int(sys.Uid), int(sys.Gid), st.Mode().Perm()
}

func TestTheModelDirectoryIsTheRuntimesUnderARootOwnedNamespaceDirectory(t *testing.T) {
	d := newDriver(t)
	dir, err := d.cacheDir("team-a", "resnet")
	if err != nil {
		t.Fatal(err)
	}
	if dir != filepath.Join(d.root, "team-a", "resnet") {
		t.Fatalf("dir = %s", dir)
	}
	if uid, gid, mode := owner(t, filepath.Dir(dir)); uid != 0 || gid != 0 || mode != 0o711 {
		t.Fatalf("namespace dir: %d:%d %o", uid, gid, mode)
	}
	if uid, gid, mode := owner(t, dir); uid != 65532 || gid != 65532 || mode != 0o750 {
		t.Fatalf("model dir: %d:%d %o", uid, gid, mode)
	}
	// A second publish finds it and keeps what is in it.
	if err := os.WriteFile(filepath.Join(dir, "pins.json"), []byte("{}"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := d.cacheDir("team-a", "resnet"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "pins.json")); err != nil {
		t.Fatal(err)
	}
}

func TestNamesThatAreNotDNSLabelsReachNoPath(t *testing.T) {
	d := newDriver(t)
	for _, pair := range [][2]string{{"..", "x"}, {"team-a", "../team-b"}, {"team-a", ""}, {"", "x"}, {"Team", "x"}, {"a/b", "x"}} {
		if _, err := d.cacheDir(pair[0], pair[1]); status.Code(err) != codes.InvalidArgument {
			t.Fatalf("%q/%q: %v", pair[0], pair[1], err)
		}
	}
	entries, _ := os.ReadDir(d.root)
	if len(entries) != 0 {
		t.Fatalf("made %v", entries)
	}
}

func TestASymlinkInPlaceOfAModelDirectoryIsRefused(t *testing.T) {
	d := newDriver(t)
	if err := os.MkdirAll(filepath.Join(d.root, "team-a"), 0o711); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/etc", filepath.Join(d.root, "team-a", "resnet")); err != nil {
		t.Fatal(err)
	}
	if _, err := d.cacheDir("team-a", "resnet"); status.Code(err) != codes.Internal {
		t.Fatalf("err = %v", err)
	}
}

func TestOnlyEphemeralInlineVolumesArePublished(t *testing.T) {
	d := newDriver(t)
	req := &csi.NodePublishVolumeRequest{
		VolumeId:         "csi-1",
		TargetPath:       filepath.Join(t.TempDir(), "target"),
		VolumeCapability: &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}}},
		VolumeContext:    map[string]string{podNamespace: "team-a", modelKey: "resnet"},
	}
	if _, err := d.NodePublishVolume(context.Background(), req); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("err = %v", err)
	}
}

func TestABindMountOnTheSameFilesystemIsAMountPointAndUnpublishUnmountsAndRemovesIt(t *testing.T) {
	d := newDriver(t)
	// The cache root and the kubelet's target on one filesystem: the bind mount keeps the device number.
	target := filepath.Join(t.TempDir(), "pods", "uid", "volumes", "cache", "mount")
	if err := os.MkdirAll(target, 0o750); err != nil {
		t.Fatal(err)
	}
	if mounted(target) {
		t.Fatalf("%s is a plain directory, not a mount point", target)
	}
	req := &csi.NodePublishVolumeRequest{
		VolumeId:         "v1",
		TargetPath:       target,
		VolumeCapability: &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}}},
		VolumeContext:    map[string]string{ephemeral: "true", podNamespace: "team-a", modelKey: "chat"},
	}
	if _, err := d.NodePublishVolume(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	if !mounted(target) {
		t.Fatalf("the bind mount at %s is not seen as a mount point", target)
	}
	// A retried publish is a no-op, not a second mount stacked on the first.
	if _, err := d.NodePublishVolume(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	unpublish := &csi.NodeUnpublishVolumeRequest{VolumeId: "v1", TargetPath: target}
	if _, err := d.NodeUnpublishVolume(context.Background(), unpublish); err != nil {
		t.Fatalf("unpublish: %v", err)
	}
	if _, err := os.Lstat(target); !os.IsNotExist(err) {
		t.Fatalf("the target is still there after unpublish (%v)", err)
	}
	if _, err := os.Stat(filepath.Join(d.root, "team-a", "chat")); err != nil {
		t.Fatalf("the cache directory must outlive the pod: %v", err)
	}
}

func TestMountinfoPathsAreReadWithTheKernelsOctalEscapes(t *testing.T) {
	info := "36 35 98:0 /cache/ns/m /var/lib/kubelet/pods/a/volumes/kubernetes.io~csi/cache/mount rw - ext4 /dev/vda rw\n" +
		"37 35 98:0 /x /mnt/with\\040space rw - ext4 /dev/vda rw\n"
	for path, want := range map[string]bool{
		"/var/lib/kubelet/pods/a/volumes/kubernetes.io~csi/cache/mount": true,
		"/mnt/with space":         true,
		"/mnt/with\\040space":     false,
		"/var/lib/kubelet/pods/a": false,
		"/cache/ns/m":             false, // a mount's source (root) is not its mount point
	} {
		if got := isMountPoint(info, path); got != want {
			t.Errorf("isMountPoint(%q) = %v, want %v", path, got, want)
		}
	}
}
