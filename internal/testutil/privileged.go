// Package testutil holds helpers shared by the tests that need a real kernel.
package testutil

import (
	"os"
	"testing"
)

// RequirePrivileged skips the test when it cannot create kernel objects (not
// root). CI sets TERN_REQUIRE_PRIVILEGED=1, which turns that skip into a
// failure so a green run always means the real-kernel tests ran.
func RequirePrivileged(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("TERN_REQUIRE_PRIVILEGED") == "1" {
		t.Fatal("test needs root (TERN_REQUIRE_PRIVILEGED=1 forbids skipping)")
	}
	t.Skip("test needs root")
}
