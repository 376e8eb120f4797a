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
