// Package mesh runs the mesh (GAMMA) tests of the Gateway API conformance suite against Outrigger
// and records the outcome of every one of them.
//
// The suite's own report counts a test for a profile only when every feature the test needs
// belongs to that profile. In the pinned release seven mesh tests need HTTPRoute features that
// are in neither MESH-HTTP nor MESH-GRPC (HTTPRouteParentRefPort,
// HTTPRouteResponseHeaderModification, HTTPRoute30xRedirectStatusCode), so the report leaves
// them out even when they run. This package runs all of them ([Features]) and writes their
// outcomes next to the report ([Outcome]).
package mesh

import (
	"slices"

	"k8s.io/apimachinery/pkg/util/sets"

	"sigs.k8s.io/gateway-api/conformance/tests"
	"sigs.k8s.io/gateway-api/conformance/utils/suite"
	"sigs.k8s.io/gateway-api/pkg/features"
)

// profiles are the conformance profiles Outrigger claims.
var profiles = []suite.ConformanceProfile{
	suite.MeshHTTPConformanceProfile,
	suite.MeshGRPCConformanceProfile,
}

// ProfileNames are the names of the profiles Outrigger claims, for the suite's options.
func ProfileNames() []suite.ConformanceProfileName {
	names := make([]suite.ConformanceProfileName, len(profiles))
	for i, profile := range profiles {
		names[i] = profile.Name
	}
	return names
}

// Tests are the suite's mesh tests (those needing the Mesh feature), in the order it runs them.
func Tests() []suite.ConformanceTest {
	var mesh []suite.ConformanceTest
	for _, test := range tests.ConformanceTests {
		if slices.Contains(test.Features, features.SupportMesh) {
			mesh = append(mesh, test)
		}
	}
	return mesh
}

// Features is every feature a mesh test needs plus the core and extended features of the
// claimed profiles, sorted: with these supported, every mesh test runs and no Gateway test does.
func Features() []features.FeatureName {
	all := sets.New[features.FeatureName]()
	for _, test := range Tests() {
		all.Insert(test.Features...)
	}
	for _, profile := range profiles {
		all = all.Union(profile.CoreFeatures).Union(profile.ExtendedFeatures)
	}
	return sets.List(all)
}

// ProfilesOf names the claimed profiles whose report counts test: those holding every feature it
// needs among their core and extended features (the rule the suite's report applies).
func ProfilesOf(test suite.ConformanceTest) []suite.ConformanceProfileName {
	counted := []suite.ConformanceProfileName{}
	for _, profile := range profiles {
		all := profile.CoreFeatures.Union(profile.ExtendedFeatures)
		if all.HasAll(test.Features...) {
			counted = append(counted, profile.Name)
		}
	}
	return counted
}
