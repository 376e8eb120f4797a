// Command kiri-cache-csi is the node plugin of the CSI driver cache.kiri.dev: it hands each edge pod its own
// directory of the node's model cache, <root>/<pod namespace>/<model>, as a CSI ephemeral inline volume.
//
// Why a CSI driver: a hostPath volume fails the Pod Security "baseline" level, and with it every tenant
// namespace that enforces it; a `csi` volume passes even "restricted". The host directory is the cluster
// admin's (the chart's edgeCache.root, this command's --root), never a ModelDeployment's: the pod names only a
// model, and the namespace is the one the kubelet reports for the pod (podInfoOnMount), so no pod can name
// another namespace's cache. The driver creates the directory owned by the runtime's uid (65532) with mode
// 0750 under a root-owned, 0711 namespace directory, so the runtime needs no root init container either.
//
// It is the only privileged part: it runs in the chart's namespace (a DaemonSet), registers itself with the
// kubelet through the plugin registration socket, and bind-mounts the directory at the target path the
// kubelet gives it. Nothing is deleted on unpublish but the mount: the cache outlives pods and revisions.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"

	csi "github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	registration "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

const (
	driverName   = "cache.kiri.dev"
	version      = "0.1.0"
	podNamespace = "csi.storage.k8s.io/pod.namespace"
	ephemeral    = "csi.storage.k8s.io/ephemeral"
	modelKey     = "model"
)

// A DNS label: what Kubernetes allows as a namespace and Kiri as a ModelDeployment name. Nothing else (no
// "..", no "/") can reach a path.
var dnsLabel = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$`)

type driver struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedNodeServer
	root     string
	nodeID   string
	uid, gid int
}

func (d *driver) GetPluginInfo(context.Context, *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	return &csi.GetPluginInfoResponse{Name: driverName, VendorVersion: version}, nil
}

func (d *driver) GetPluginCapabilities(context.Context, *csi.GetPluginCapabilitiesRequest) (*csi.GetPluginCapabilitiesResponse, error) {
	return &csi.GetPluginCapabilitiesResponse{}, nil // node plugin only: no controller, no topology
}

func (d *driver) Probe(context.Context, *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	if st, err := os.Stat(d.root); err != nil || !st.IsDir() {
		return nil, status.Errorf(codes.FailedPrecondition, "cache root %s is not a directory: %v", d.root, err)
	}
	return &csi.ProbeResponse{}, nil
}

func (d *driver) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	return &csi.NodeGetCapabilitiesResponse{}, nil
}

func (d *driver) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: d.nodeID}, nil
}

// cacheDir is <root>/<namespace>/<model>, made if missing: the namespace directory root-owned 0711 (a pod
// of one namespace cannot list the others), the model directory owned by the runtime's uid, 0750.
func (d *driver) cacheDir(namespace, model string) (string, error) {
	if !dnsLabel.MatchString(namespace) || !dnsLabel.MatchString(model) {
		return "", status.Errorf(codes.InvalidArgument, "namespace %q and model %q must be DNS labels", namespace, model)
	}
	nsDir := filepath.Join(d.root, namespace)
	if err := ensureDir(nsDir, 0o711, 0, 0); err != nil {
		return "", err
	}
	dir := filepath.Join(nsDir, model)
	if err := ensureDir(dir, 0o750, d.uid, d.gid); err != nil {
		return "", err
	}
	return dir, nil
}

// ensureDir makes dir (not following a symlink in its place) and sets its owner and mode.
func ensureDir(dir string, mode os.FileMode, uid, gid int) error {
	if err := os.Mkdir(dir, mode); err != nil && !errors.Is(err, os.ErrExist) {
		return status.Errorf(codes.Internal, "mkdir %s: %v", dir, err)
	}
	st, err := os.Lstat(dir)
	if err != nil {
		return status.Errorf(codes.Internal, "stat %s: %v", dir, err)
	}
	if !st.IsDir() {
		return status.Errorf(codes.Internal, "%s is not a directory", dir)
	}
	if err := os.Lchown(dir, uid, gid); err != nil {
		return status.Errorf(codes.Internal, "chown %s: %v", dir, err)
	}
	if err := os.Chmod(dir, mode); err != nil {
		return status.Errorf(codes.Internal, "chmod %s: %v", dir, err)
	}
	return nil
}

// mounted says whether target is a mount point, from /proc/self/mountinfo. Comparing the device of target and
// its parent is not enough: the bind mount of a cache directory onto a target on the same filesystem (the
// cache root and the kubelet's root on one disk, the usual case) keeps the device, so a mount point looked
// like a plain directory, unpublish skipped the unmount, its remove failed with EBUSY and the pod never
// finished terminating.
func mounted(target string) bool {
	info, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return false
	}
	return isMountPoint(string(info), filepath.Clean(target))
}

// isMountPoint says whether path is the mount point (the fifth field, octal-escaped) of a line of mountinfo.
func isMountPoint(mountinfo, path string) bool {
	for _, line := range strings.Split(mountinfo, "\n") {
		fields := strings.Fields(line)
		if len(fields) > 4 && unescapeMountPath(fields[4]) == path {
			return true
		}
	}
	return false
}

// unescapeMountPath undoes the kernel's escaping of a mountinfo path: space, tab, newline and backslash as
// \ooo octal.
func unescapeMountPath(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func (d *driver) NodePublishVolume(_ context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	target := req.GetTargetPath()
	if target == "" || req.GetVolumeId() == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id and target path are required")
	}
	if req.GetVolumeCapability().GetMount() == nil {
		return nil, status.Error(codes.InvalidArgument, "only filesystem (mount) volumes are served")
	}
	attrs := req.GetVolumeContext()
	if attrs[ephemeral] != "true" {
		return nil, status.Error(codes.InvalidArgument, "only ephemeral inline volumes are served (set podInfoOnMount)")
	}
	dir, err := d.cacheDir(attrs[podNamespace], attrs[modelKey])
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(target, 0o750); err != nil {
		return nil, status.Errorf(codes.Internal, "mkdir %s: %v", target, err)
	}
	if mounted(target) {
		return &csi.NodePublishVolumeResponse{}, nil // a retried call: already done
	}
	if err := unix.Mount(dir, target, "", unix.MS_BIND, ""); err != nil {
		return nil, status.Errorf(codes.Internal, "bind %s on %s: %v", dir, target, err)
	}
	flags := uintptr(unix.MS_BIND | unix.MS_REMOUNT | unix.MS_NOSUID | unix.MS_NODEV)
	if req.GetReadonly() {
		flags |= unix.MS_RDONLY
	}
	if err := unix.Mount("", target, "", flags, ""); err != nil {
		_ = unix.Unmount(target, 0)
		return nil, status.Errorf(codes.Internal, "remount %s: %v", target, err)
	}
	log.Printf("published %s for volume %s at %s", dir, req.GetVolumeId(), target)
	return &csi.NodePublishVolumeResponse{}, nil
}

func (d *driver) NodeUnpublishVolume(_ context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	target := req.GetTargetPath()
	if target == "" {
		return nil, status.Error(codes.InvalidArgument, "target path is required")
	}
	if mounted(target) {
		if err := unix.Unmount(target, 0); err != nil {
			return nil, status.Errorf(codes.Internal, "unmount %s: %v", target, err)
		}
	}
	if err := os.Remove(target); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, status.Errorf(codes.Internal, "remove %s: %v", target, err)
	}
	log.Printf("unpublished volume %s from %s", req.GetVolumeId(), target)
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// registrar answers the kubelet's plugin watcher (what node-driver-registrar does, in the same process).
type registrar struct {
	registration.UnimplementedRegistrationServer
	endpoint string
}

func (r *registrar) GetInfo(context.Context, *registration.InfoRequest) (*registration.PluginInfo, error) {
	return &registration.PluginInfo{
		Type:              registration.CSIPlugin,
		Name:              driverName,
		Endpoint:          r.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (r *registrar) NotifyRegistrationStatus(_ context.Context, s *registration.RegistrationStatus) (*registration.RegistrationStatusResponse, error) {
	if !s.PluginRegistered {
		log.Printf("the kubelet refused the registration: %s", s.Error)
	} else {
		log.Printf("registered with the kubelet")
	}
	return &registration.RegistrationStatusResponse{}, nil
}

func listen(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	return net.Listen("unix", path)
}

func main() {
	endpoint := flag.String("endpoint", "/var/lib/kubelet/plugins/cache.kiri.dev/csi.sock", "the CSI socket this plugin serves")
	kubeletEndpoint := flag.String("kubelet-endpoint", "", "the CSI socket's path as the kubelet sees it (default: --endpoint)")
	registry := flag.String("registration-dir", "/var/lib/kubelet/plugins_registry", "the kubelet's plugin registration directory")
	root := flag.String("root", "/var/lib/kiri/cache", "the node cache: <root>/<namespace>/<model> per edge pod")
	nodeID := flag.String("node-id", os.Getenv("NODE_NAME"), "this node's name")
	uid := flag.Int("uid", 65532, "owner of the model directories (the runtime's uid)")
	gid := flag.Int("gid", 65532, "group of the model directories")
	flag.Parse()
	if *nodeID == "" {
		log.Fatal("--node-id (or NODE_NAME) is required")
	}
	if *kubeletEndpoint == "" {
		*kubeletEndpoint = *endpoint
	}
	if err := os.MkdirAll(*root, 0o711); err != nil {
		log.Fatalf("cache root: %v", err)
	}
	d := &driver{root: *root, nodeID: *nodeID, uid: *uid, gid: *gid}
	csiServer := grpc.NewServer()
	csi.RegisterIdentityServer(csiServer, d)
	csi.RegisterNodeServer(csiServer, d)
	csiListener, err := listen(*endpoint)
	if err != nil {
		log.Fatalf("listen %s: %v", *endpoint, err)
	}
	regServer := grpc.NewServer()
	registration.RegisterRegistrationServer(regServer, &registrar{endpoint: *kubeletEndpoint})
	regPath := filepath.Join(*registry, driverName+"-reg.sock")
	regListener, err := listen(regPath)
	if err != nil {
		log.Fatalf("listen %s: %v", regPath, err)
	}
	go func() { log.Fatal(csiServer.Serve(csiListener)) }()
	go func() { log.Fatal(regServer.Serve(regListener)) }()
	log.Printf("%s %s serving %s for node %s, cache root %s", driverName, version, *endpoint, *nodeID, *root)
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
	regServer.Stop()
	_ = os.Remove(regPath) // the kubelet deregisters a plugin whose socket is gone
	csiServer.GracefulStop()
	fmt.Fprintln(os.Stderr, "stopped")
}
