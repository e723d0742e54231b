// What Features, ProfilesOf and Recorder do with the pinned suite (no cluster needed; run by
// `cargo xtask conformance build` before it builds anything).

package mesh

import (
	"slices"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/util/sets"

	"sigs.k8s.io/gateway-api/conformance/utils/suite"
	"sigs.k8s.io/gateway-api/pkg/features"
)

func TestFeaturesRunEveryMeshTestAndNoGatewayTest(t *testing.T) {
	supported := sets.New(Features()...)
	for _, test := range Tests() {
		if !supported.HasAll(test.Features...) {
			t.Errorf("%s needs %v, not all in Features()", test.ShortName, test.Features)
		}
	}
	gateway := features.SetsToNamesSet(features.GatewayCoreFeatures, features.GatewayExtendedFeatures)
	if both := supported.Intersection(gateway); both.Len() > 0 {
		t.Errorf("Features() holds Gateway features %v: the suite would set up Gateways", sets.List(both))
	}
	if mesh := features.SetsToNamesSet(features.MeshExtendedFeatures); !supported.IsSuperset(mesh) {
		t.Errorf("Features() lacks the mesh extended features %v", sets.List(mesh.Difference(supported)))
	}
}

// The suite's report counts a test for a profile only if the profile holds all its features.
func TestProfilesOfFollowsTheReportsRule(t *testing.T) {
	want := map[string][]suite.ConformanceProfileName{
		"MeshBasic":           {suite.MeshHTTPConformanceProfileName, suite.MeshGRPCConformanceProfileName},
		"MeshTrafficSplit":    {suite.MeshHTTPConformanceProfileName},
		"MeshGRPCRouteWeight": {suite.MeshGRPCConformanceProfileName},
		// HTTPRouteParentRefPort and HTTPRouteResponseHeaderModification are in neither profile.
		"MeshPorts": nil,
	}
	for _, test := range Tests() {
		if expected, ok := want[test.ShortName]; ok {
			if got := ProfilesOf(test); !slices.Equal(got, expected) {
				t.Errorf("ProfilesOf(%s) = %v, want %v", test.ShortName, got, expected)
			}
			delete(want, test.ShortName)
		}
	}
	if len(want) > 0 {
		t.Errorf("the suite has no mesh tests named %v", want)
	}
}

func TestOutcomesCountOnlyPassesAndExcuseOnlyTestsLeftOutByName(t *testing.T) {
	var recorder Recorder
	recorder.record("MeshBasic", false, false)
	recorder.record("MeshPorts", false, true)
	recorder.record("MeshTrafficSplit", true, false)
	recorder.record("MeshFrontend", false, true)
	outcomes := recorder.Outcomes()

	results := map[string]Result{}
	for _, outcome := range outcomes.Tests {
		results[outcome.Test] = outcome.Result
	}
	for test, want := range map[string]Result{
		"MeshBasic": Passed, "MeshPorts": Skipped, "MeshTrafficSplit": Failed, "MeshHTTPRouteWeight": NotRun,
	} {
		if results[test] != want {
			t.Errorf("%s: result %q, want %q", test, results[test], want)
		}
	}
	if len(outcomes.Tests) != len(Tests()) {
		t.Errorf("%d outcomes for %d mesh tests", len(outcomes.Tests), len(Tests()))
	}
	if want := "1 of "; !strings.HasPrefix(outcomes.Summary, want) {
		t.Errorf("summary %q does not start with %q", outcomes.Summary, want)
	}

	unpassed := outcomes.Unpassed(suite.ConfigurableOptions{SkipTests: []string{"MeshFrontend"}})
	if !slices.Contains(unpassed, "MeshPorts (skipped)") || !slices.Contains(unpassed, "MeshTrafficSplit (failed)") ||
		!slices.Contains(unpassed, "MeshHTTPRouteWeight (not-run)") || slices.ContainsFunc(unpassed, func(s string) bool {
		return strings.HasPrefix(s, "MeshFrontend ") || strings.HasPrefix(s, "MeshBasic ")
	}) {
		t.Errorf("unpassed with MeshFrontend skipped by name: %v", unpassed)
	}
	if unpassed := outcomes.Unpassed(suite.ConfigurableOptions{RunTest: "MeshBasic"}); len(unpassed) != 0 {
		t.Errorf("unpassed when only MeshBasic was asked for: %v", unpassed)
	}
}
