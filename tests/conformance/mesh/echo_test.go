//go:build echo

// The echo image's binaries, built from images.conf, behave as the suite expects: run by `cargo
// xtask conformance build` once it has built them, as
// `go test -tags echo ./mesh -args -outrigger.image-rootfs=DIR` (images.conf: `check echo`).

package mesh

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/gateway-api/conformance/utils/echo"
)

var imageRootfs = flag.String("outrigger.image-rootfs", "", "the built echo-advanced image's root directory")

// TestEchoImage starts the server with the mesh manifests' arguments (on free ports) and sends
// it what the mesh tests send through the client, parsing the answers with the suite's parser.
func TestEchoImage(t *testing.T) {
	if *imageRootfs == "" {
		t.Fatal("-outrigger.image-rootfs is required: the directory holding usr/local/bin/{server,client}")
	}
	root := *imageRootfs
	ports := freePorts(t, 4)
	httpPort, grpcPort, tcpPort, tlsPort := ports[0], ports[1], ports[2], ports[3]
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	server := exec.CommandContext(ctx, filepath.Join(root, "usr/local/bin/server"),
		"--tcp="+tcpPort, "--port="+httpPort, "--grpc="+grpcPort, "--port="+tlsPort, "--tls="+tlsPort,
		"--crt="+filepath.Join(root, "cert.crt"), "--key="+filepath.Join(root, "cert.key"))
	var serverLog strings.Builder
	server.Stdout, server.Stderr = &serverLog, &serverLog
	if err := server.Start(); err != nil {
		t.Fatalf("starting the echo server: %v", err)
	}
	t.Cleanup(func() {
		cancel()
		_ = server.Wait()
		if t.Failed() {
			t.Logf("echo server output:\n%s", serverLog.String())
		}
	})
	hostname, err := os.Hostname()
	if err != nil {
		t.Fatalf("reading the hostname: %v", err)
	}

	// As echo.MeshPod runs it: `client URL [--method=M] [-H name:value]... [--count=N]`.
	client := func(args ...string) string {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for {
			output, err := exec.Command(filepath.Join(root, "usr/local/bin/client"), args...).CombinedOutput()
			if err == nil {
				return string(output)
			}
			if time.Now().After(deadline) {
				t.Fatalf("client %v: %v\n%s", args, err, output)
			}
			time.Sleep(200 * time.Millisecond) // the server may not be listening yet
		}
	}

	// The server answers 503 until all its listeners are up, a few seconds after it starts (the
	// mesh manifests have no readiness probe, so the suite's first requests may see that too).
	for _, url := range []string{"http://127.0.0.1:" + httpPort + "/", "grpc://127.0.0.1:" + grpcPort} {
		deadline := time.Now().Add(20 * time.Second)
		for code := ""; code != "200"; code = echo.ParseResponse(client(url)).Code {
			if time.Now().After(deadline) {
				t.Fatalf("%s still answers %q after 20 s", url, code)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}

	t.Run("an HTTP request reports the code, the serving host and the request headers", func(t *testing.T) {
		response := echo.ParseResponse(client("http://127.0.0.1:"+httpPort+"/some/path",
			"--method=GET", "-H", "X-Header-Add:original-val-add", "-H", "Host:echo-v2"))
		if response.Code != "200" || response.Hostname != hostname || response.Method != "GET" {
			t.Errorf("code %q, hostname %q, method %q; want 200, %q, GET", response.Code, response.Hostname,
				response.Method, hostname)
		}
		if got := response.RequestHeaders.Get("X-Header-Add"); got != "original-val-add" {
			t.Errorf("request header X-Header-Add = %q, want original-val-add", got)
		}
		if response.Host != "echo-v2" || response.URL != "/some/path" {
			t.Errorf("host %q and URL %q, want echo-v2 and /some/path", response.Host, response.URL)
		}
	})

	t.Run("a redirect is reported, not followed", func(t *testing.T) {
		response := echo.ParseResponse(client("http://127.0.0.1:" + httpPort + "/?codes=302&headers=Location:/elsewhere"))
		if response.Code != "302" || response.ResponseHeaders.Get("Location") != "/elsewhere" {
			t.Errorf("code %q, Location %q; want 302 and /elsewhere\n%s", response.Code,
				response.ResponseHeaders.Get("Location"), response.RawContent)
		}
	})

	// echo.MeshPod.RequestBatch splits the output of --count at blank lines, one answer each.
	for _, scheme := range []struct{ name, url string }{
		{"http", "http://127.0.0.1:" + httpPort + "/"},
		{"grpc", "grpc://127.0.0.1:" + grpcPort},
	} {
		t.Run(fmt.Sprintf("a %s batch answers once per request, separated by blank lines", scheme.name), func(t *testing.T) {
			const count = 20
			answers := 0
			for _, section := range strings.Split(client(scheme.url, fmt.Sprintf("--count=%d", count)), "\n\n") {
				response := echo.ParseResponse(section)
				if response.Hostname == "" && response.Code == "" {
					continue
				}
				answers++
				if response.Hostname != hostname || response.Code != "200" {
					t.Errorf("answer %d: hostname %q, code %q; want %q, 200", answers, response.Hostname, response.Code, hostname)
				}
			}
			if answers != count {
				t.Errorf("%d answers to %d requests", answers, count)
			}
		})
	}
}

func freePorts(t *testing.T, n int) []string {
	t.Helper()
	var ports []string
	var listeners []net.Listener
	for range n {
		listener, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("finding a free port: %v", err)
		}
		listeners = append(listeners, listener)
		ports = append(ports, fmt.Sprint(listener.Addr().(*net.TCPAddr).Port))
	}
	for _, listener := range listeners {
		_ = listener.Close()
	}
	return ports
}
