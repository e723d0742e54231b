package mesh

import (
	"fmt"
	"os"
	"slices"
	"sync"
	"testing"

	"sigs.k8s.io/yaml"

	"sigs.k8s.io/gateway-api/conformance/utils/suite"
	"sigs.k8s.io/gateway-api/pkg/consts"
	"sigs.k8s.io/gateway-api/pkg/features"
)

// Result of one test in a run.
type Result string

const (
	Passed  Result = "passed"
	Failed  Result = "failed"
	Skipped Result = "skipped"
	// NotRun: the suite never reached the test (it stopped early, e.g. --fail-fast).
	NotRun Result = "not-run"
)

// Outcome is what happened to one mesh test.
type Outcome struct {
	Test     string                 `json:"test"`
	Result   Result                 `json:"result"`
	Features []features.FeatureName `json:"features"`
	// Profiles whose report counts the test; empty for the tests the suite's report leaves out.
	Profiles []suite.ConformanceProfileName `json:"profiles"`
}

// Outcomes is the file written next to the suite's report.
type Outcomes struct {
	GatewayAPIVersion string    `json:"gatewayAPIVersion"`
	Summary           string    `json:"summary"`
	Tests             []Outcome `json:"tests"`
}

// Recorder collects each test's result through the suite's per-test hook.
type Recorder struct {
	mu      sync.Mutex
	results map[string]Result
}

// Hook is the suite's ConformanceOptions.Hook, called when each test has finished.
func (r *Recorder) Hook(t *testing.T, test suite.ConformanceTest, _ *suite.ConformanceTestSuite) {
	r.record(test.ShortName, t.Failed(), t.Skipped())
}

func (r *Recorder) record(test string, failed, skipped bool) {
	result := Passed
	switch {
	case failed:
		result = Failed
	case skipped:
		result = Skipped
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.results == nil {
		r.results = map[string]Result{}
	}
	r.results[test] = result
}

// Outcomes of every mesh test so far, in the suite's order.
func (r *Recorder) Outcomes() Outcomes {
	r.mu.Lock()
	defer r.mu.Unlock()
	var outcomes []Outcome
	passed := 0
	for _, test := range Tests() {
		result, ok := r.results[test.ShortName]
		if !ok {
			result = NotRun
		}
		if result == Passed {
			passed++
		}
		outcomes = append(outcomes, Outcome{
			Test:     test.ShortName,
			Result:   result,
			Features: test.Features,
			Profiles: ProfilesOf(test),
		})
	}
	return Outcomes{
		GatewayAPIVersion: consts.BundleVersion,
		Summary:           fmt.Sprintf("%d of %d mesh tests passed", passed, len(outcomes)),
		Tests:             outcomes,
	}
}

// Unpassed names the tests that were meant to run and did not pass. A test is meant to run
// unless the options leave it out by name (--run-test names another, or --skip-tests names it):
// a test skipped for want of a feature counts as not passed.
func (o Outcomes) Unpassed(options suite.ConfigurableOptions) []string {
	var unpassed []string
	for _, outcome := range o.Tests {
		leftOut := (options.RunTest != "" && options.RunTest != outcome.Test) ||
			slices.Contains(options.SkipTests, outcome.Test)
		if outcome.Result != Passed && !leftOut {
			unpassed = append(unpassed, fmt.Sprintf("%s (%s)", outcome.Test, outcome.Result))
		}
	}
	return unpassed
}

// Write writes the outcomes as YAML to path.
func (o Outcomes) Write(path string) error {
	data, err := yaml.Marshal(o)
	if err != nil {
		return fmt.Errorf("encoding the mesh test outcomes: %w", err)
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		return fmt.Errorf("writing the mesh test outcomes to %s: %w", path, err)
	}
	return nil
}
