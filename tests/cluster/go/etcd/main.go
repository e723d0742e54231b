// Command outrigger-etcd runs a single-member etcd for the test cluster.
//
// etcd's own module cannot be `go install`ed (its go.mod replaces sibling modules with local
// paths), so the test cluster builds this small wrapper around the embed package instead. It
// takes only the settings a throwaway loopback cluster needs.
package main

import (
	"flag"
	"fmt"
	"net/url"
	"os"
	"os/signal"
	"syscall"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
)

func main() {
	dataDir := flag.String("data-dir", "", "directory for etcd's data (required; thrown away afterwards)")
	clientURL := flag.String("listen-client-url", "http://127.0.0.1:2379", "URL to serve clients (the API server) on")
	peerURL := flag.String("listen-peer-url", "http://127.0.0.1:2380", "URL for the (unused) peer port; must be free")
	noFsync := flag.Bool("unsafe-no-fsync", true, "skip fsync: the data is thrown away, and fsync dominates start-up and write latency")
	flag.Parse()
	if *dataDir == "" {
		fail("--data-dir is required")
	}

	cfg := embed.NewConfig()
	cfg.Name = "outrigger-test"
	cfg.Dir = *dataDir
	cfg.UnsafeNoFsync = *noFsync
	cfg.LogLevel = "warn"
	// Left at zero, every request would be logged as slow.
	cfg.WarningUnaryRequestDuration = embed.DefaultWarningUnaryRequestDuration
	cfg.ListenClientUrls = []url.URL{mustParseURL(*clientURL)}
	cfg.AdvertiseClientUrls = cfg.ListenClientUrls
	cfg.ListenPeerUrls = []url.URL{mustParseURL(*peerURL)}
	cfg.AdvertisePeerUrls = cfg.ListenPeerUrls
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	// The API server relies on progress notifications for consistent reads from its watch cache.
	cfg.WatchProgressNotifyInterval = 5 * time.Second

	server, err := embed.StartEtcd(cfg)
	if err != nil {
		fail("starting etcd: %v", err)
	}
	defer server.Close()

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
	select {
	case <-server.Server.ReadyNotify():
		fmt.Fprintf(os.Stderr, "outrigger-etcd: ready, serving clients on %s\n", *clientURL)
	case <-time.After(60 * time.Second):
		server.Server.Stop()
		fail("etcd did not become ready within 60s")
	case sig := <-signals:
		fail("stopped by %v before becoming ready", sig)
	}

	select {
	case err := <-server.Err():
		fail("etcd failed: %v", err)
	case sig := <-signals:
		// The data dies with the cluster, so a graceful Close (seconds spent draining client
		// connections) buys nothing; stop raft and leave.
		fmt.Fprintf(os.Stderr, "outrigger-etcd: %v, stopping\n", sig)
		server.Server.HardStop()
		os.Exit(0)
	}
}

func mustParseURL(raw string) url.URL {
	parsed, err := url.Parse(raw)
	if err != nil {
		fail("invalid URL %q: %v", raw, err)
	}
	return *parsed
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "outrigger-etcd: "+format+"\n", args...)
	os.Exit(1)
}
