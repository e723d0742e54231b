// images.conf against the suite's manifests (no cluster needed; run by `cargo xtask conformance
// build` before it builds anything).

package mesh

import (
	"bufio"
	"errors"
	"io"
	"os"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/util/sets"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"

	"sigs.k8s.io/gateway-api/conformance"
)

// images.conf must build exactly the images the mesh tests deploy, and importing them into the
// nodes must be enough (no pull forced by policy or digest).
func TestImagesConfNamesExactlyTheImagesOfTheMeshManifests(t *testing.T) {
	manifests := []string{"mesh/manifests.yaml"}
	for _, test := range Tests() {
		manifests = append(manifests, test.Manifests...)
	}
	deployed := sets.New[string]()
	for _, name := range manifests {
		file, err := conformance.Manifests.Open(name)
		if err != nil {
			t.Fatalf("opening the suite's %s: %v", name, err)
		}
		decoder := utilyaml.NewYAMLOrJSONDecoder(file, 4096)
		for {
			var document map[string]any
			if err := decoder.Decode(&document); errors.Is(err, io.EOF) {
				break
			} else if err != nil {
				t.Fatalf("decoding the suite's %s: %v", name, err)
			}
			for _, container := range containersIn(document) {
				image, _ := container["image"].(string)
				policy, _ := container["imagePullPolicy"].(string)
				if strings.Contains(image, "@") || policy == "Always" || policy == "" && strings.HasSuffix(image, ":latest") {
					t.Errorf("%s: image %s (pull policy %q) is pulled even when imported", name, image, policy)
				}
				deployed.Insert(image)
			}
		}
		_ = file.Close()
	}
	configured := sets.New[string]()
	forEachLine(t, "../images.conf", func(line string) {
		if reference, ok := strings.CutPrefix(line, "image "); ok {
			configured.Insert(strings.TrimSpace(reference))
		}
	})
	if missing := deployed.Difference(configured); missing.Len() > 0 {
		t.Errorf("the mesh manifests deploy %v, which ../images.conf does not build", sets.List(missing))
	}
	if unused := configured.Difference(deployed); unused.Len() > 0 {
		t.Errorf("../images.conf builds %v, which no mesh manifest deploys", sets.List(unused))
	}
}

// containersIn returns the containers and init containers anywhere in a decoded manifest.
func containersIn(value any) []map[string]any {
	var found []map[string]any
	switch value := value.(type) {
	case map[string]any:
		for key, inner := range value {
			if list, ok := inner.([]any); ok && (key == "containers" || key == "initContainers") {
				for _, item := range list {
					if container, ok := item.(map[string]any); ok {
						found = append(found, container)
					}
				}
				continue
			}
			found = append(found, containersIn(inner)...)
		}
	case []any:
		for _, inner := range value {
			found = append(found, containersIn(inner)...)
		}
	}
	return found
}

func forEachLine(t *testing.T, path string, each func(line string)) {
	t.Helper()
	file, err := os.Open(path)
	if err != nil {
		t.Fatalf("opening %s: %v", path, err)
	}
	defer file.Close()
	scanner := bufio.NewScanner(file)
	for scanner.Scan() {
		each(scanner.Text())
	}
	if err := scanner.Err(); err != nil {
		t.Fatalf("reading %s: %v", path, err)
	}
}
