// REQUIREMENTS.md against the pinned suite (no cluster needed; run by `cargo xtask conformance
// build` before it builds anything).

package mesh

import (
	"regexp"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/util/sets"

	"sigs.k8s.io/gateway-api/pkg/consts"
)

// REQUIREMENTS.md has one "### `Name`" section per mesh test of the pinned release.
func TestRequirementsDescribeEveryMeshTest(t *testing.T) {
	heading := regexp.MustCompile("^### `([A-Za-z0-9]+)`")
	described := sets.New[string]()
	mentionsVersion := false
	forEachLine(t, "../REQUIREMENTS.md", func(line string) {
		if match := heading.FindStringSubmatch(line); match != nil {
			described.Insert(match[1])
		}
		mentionsVersion = mentionsVersion || strings.Contains(line, consts.BundleVersion)
	})
	tests := sets.New[string]()
	for _, test := range Tests() {
		tests.Insert(test.ShortName)
	}
	if missing := tests.Difference(described); missing.Len() > 0 {
		t.Errorf("../REQUIREMENTS.md does not describe the mesh tests %v", sets.List(missing))
	}
	if gone := described.Difference(tests); gone.Len() > 0 {
		t.Errorf("../REQUIREMENTS.md describes %v, which the pinned suite does not have", sets.List(gone))
	}
	if !mentionsVersion {
		t.Errorf("../REQUIREMENTS.md never names the pinned release %s", consts.BundleVersion)
	}
}
