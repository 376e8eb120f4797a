// Command kstatus reads one Kubernetes object as JSON on stdin and prints the status that
// sigs.k8s.io/cli-utils/pkg/kstatus/status computes for it (what Flux and kpt/Config Sync read):
// {"status": "Current|InProgress|Failed|Terminating|NotFound|Unknown", "message": "...", "conditions": [...]}.
// Tests use it to check ModelDeployment objects against kstatus itself rather than a re-implementation.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

func main() {
	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail(err)
	}
	obj := map[string]any{}
	// apimachinery's decoder, as the API machinery reads objects: whole numbers become int64, which
	// unstructured's accessors (metadata.generation, status.observedGeneration) require.
	if err := utiljson.Unmarshal(data, &obj); err != nil {
		fail(fmt.Errorf("stdin is not a JSON object: %w", err))
	}
	res, err := status.Compute(&unstructured.Unstructured{Object: obj})
	if err != nil {
		fail(err)
	}
	out, err := json.Marshal(map[string]any{
		"status":     res.Status.String(),
		"message":    res.Message,
		"conditions": res.Conditions,
	})
	if err != nil {
		fail(err)
	}
	fmt.Println(string(out))
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "kstatus:", err)
	os.Exit(2)
}
