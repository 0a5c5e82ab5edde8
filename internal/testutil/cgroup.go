package testutil

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// NewCgroup creates a child cgroup under the cgroup v2 mount (never the
// machine's root itself: programs a test attaches there would run for
// every process) and removes it when the test ends. The cgroup must be
// empty by then: processes started in it with StartInCgroup are waited
// for.
func NewCgroup(t testing.TB) string {
	t.Helper()
	RequirePrivileged(t)
	root, err := cgroup2Mount()
	if err != nil || root == "" {
		t.Fatalf("no cgroup v2 hierarchy mounted (%v)", err)
	}
	dir := filepath.Join(root, UniqueName("terntest"))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatalf("create cgroup %s: %v", dir, err)
	}
	t.Cleanup(func() {
		// A process that just exited may still be counted for a moment.
		for i := 0; i < 50; i++ {
			err := os.Remove(dir)
			if err == nil || errors.Is(err, os.ErrNotExist) {
				return
			}
			if !errors.Is(err, syscall.EBUSY) {
				t.Errorf("remove cgroup %s: %v", dir, err)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Errorf("remove cgroup %s: still busy", dir)
	})
	return dir
}

// cgroup2Mount is the mount point of the cgroup v2 hierarchy.
func cgroup2Mount() (string, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		f := strings.Fields(pre)
		if ok && strings.HasPrefix(post, "cgroup2 ") && len(f) >= 5 && f[3] == "/" {
			return f[4], nil
		}
	}
	return "", sc.Err()
}

// sockClientEnv selects the socket client mode of a test binary started
// by SockClient (see SockClientMain).
const sockClientEnv = "TERN_TEST_SOCK_CLIENT"

// SockClient runs a one-shot socket client, a copy of the test binary
// (its package must call SockClientMain from an init function), as a
// process in network namespace n and cgroup dir: where a host process of
// the node would run, seen by cgroup socket programs attached to dir. Its
// output, a line, is returned; a failure's error text includes the
// client's (e.g. "connection refused").
//
// Modes: "tcp ADDR" dials, reads a line and prints "<peer> <line>" (peer as
// getpeername reports it); "udp ADDR MSG" sends MSG from an unconnected
// socket and prints "<source> <answer>"; "udpconn ADDR MSG" does the same
// from a connected socket (recvfrom's source).
func SockClient(n ns.NetNS, dir string, args ...string) (string, error) {
	cg, err := os.Open(dir)
	if err != nil {
		return "", err
	}
	defer cg.Close()
	self, err := os.Executable()
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var stdout, stderr bytes.Buffer
	err = n.Do(func(ns.NetNS) error {
		cmd := exec.CommandContext(ctx, self, args...)
		cmd.Env = append(os.Environ(), sockClientEnv+"=1")
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
		return cmd.Run()
	})
	if err != nil {
		return "", fmt.Errorf("sock client %v: %w: %s", args, err, strings.TrimSpace(stderr.String()))
	}
	return strings.TrimSpace(stdout.String()), nil
}

// SockClientMain runs the client when the binary was started by
// SockClient, and exits; otherwise it returns at once. Call it from an
// init function of the test package.
func SockClientMain() {
	if os.Getenv(sockClientEnv) == "" {
		return
	}
	out, err := sockClient(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(out)
	os.Exit(0)
}

func sockClient(args []string) (string, error) {
	if len(args) < 2 {
		return "", fmt.Errorf("usage: tcp|udp|udpconn ADDR [MSG]")
	}
	deadline := time.Now().Add(3 * time.Second)
	switch args[0] {
	case "tcp":
		c, err := net.DialTimeout("tcp4", args[1], 2*time.Second)
		if err != nil {
			return "", err
		}
		defer c.Close()
		_ = c.SetDeadline(deadline)
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return "", err
		}
		// Go takes RemoteAddr from getpeername after connect.
		return c.RemoteAddr().String() + " " + strings.TrimSpace(line), nil
	case "udp", "udpconn":
		if len(args) < 3 {
			return "", fmt.Errorf("%s needs a message", args[0])
		}
		to, err := net.ResolveUDPAddr("udp4", args[1])
		if err != nil {
			return "", err
		}
		var c *net.UDPConn
		if args[0] == "udp" {
			c, err = net.ListenUDP("udp4", nil)
			if err == nil {
				_, err = c.WriteToUDP([]byte(args[2]), to)
			}
		} else {
			c, err = net.DialUDP("udp4", nil, to)
			if err == nil {
				_, err = c.Write([]byte(args[2]))
			}
		}
		if c != nil {
			defer c.Close()
		}
		if err != nil {
			return "", err
		}
		_ = c.SetDeadline(deadline)
		buf := make([]byte, 1500)
		n, from, err := c.ReadFromUDP(buf)
		if err != nil {
			return "", err
		}
		return from.String() + " " + strings.TrimSpace(string(buf[:n])), nil
	}
	return "", fmt.Errorf("unknown mode %q", args[0])
}
