//go:build cluster

// The suite itself, against the cluster the kubeconfig names: built by `cargo xtask conformance
// build` as `go test -c -tags cluster` and run by `cargo xtask conformance run`.

package mesh

import (
	"flag"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/gateway-api/conformance"
	"sigs.k8s.io/gateway-api/conformance/utils/suite"
)

var outcomesOutput = flag.String("outrigger.outcomes-output", "",
	"where to write the outcome of every mesh test as YAML, including those the suite's report leaves out")

var only = flag.String("outrigger.only", "",
	"comma-separated mesh tests to run: the others are left out, as --skip-tests would")

// TestMesh runs the suite with the suite's own flags (--report-output, --namespace-labels, ...),
// supporting Features and claiming the MESH profiles unless the flags say otherwise, and fails
// unless every mesh test the flags select passed.
func TestMesh(t *testing.T) {
	options := conformance.DefaultOptions(t)
	if len(options.SupportedFeatures) == 0 {
		options.SupportedFeatures = Features()
	}
	if len(options.ConformanceProfiles) == 0 {
		options.ConformanceProfiles = ProfileNames()
	}
	if *only != "" {
		selected := strings.Split(*only, ",")
		for _, name := range selected {
			if !slices.ContainsFunc(Tests(), func(test suite.ConformanceTest) bool { return test.ShortName == name }) {
				t.Fatalf("-outrigger.only: %q is not a mesh test", name)
			}
		}
		for _, test := range Tests() {
			if !slices.Contains(selected, test.ShortName) {
				options.SkipTests = append(options.SkipTests, test.ShortName)
			}
		}
	}
	var recorder Recorder
	options.Hook = recorder.Hook
	// Registered before the suite registers the writing of its report, so it runs after it.
	t.Cleanup(func() {
		outcomes := recorder.Outcomes()
		t.Log(outcomes.Summary)
		if *outcomesOutput != "" {
			if err := outcomes.Write(*outcomesOutput); err != nil {
				t.Error(err)
			}
		}
		if unpassed := outcomes.Unpassed(options.ConfigurableOptions); len(unpassed) > 0 {
			t.Errorf("mesh tests that did not pass: %s", strings.Join(unpassed, ", "))
		}
	})
	conformance.RunConformanceWithOptions(t, options)
}
