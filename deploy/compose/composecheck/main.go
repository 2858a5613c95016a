// composecheck loads a compose file the way `docker compose config` does, with compose-go (the library
// the docker compose CLI is built on), and prints the resolved model as JSON: interpolation, YAML merge
// keys, env_file contents merged into each service's environment, every profile enabled, the schema and
// the consistency checks (references to services, secrets, volumes, networks). No Docker daemon needed.
//
//	go run . ../../../docker-compose.yml > resolved.json
//
// tests/test_compose.py runs it when `go` is installed.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/compose-spec/compose-go/v2/cli"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: composecheck COMPOSE_FILE")
		os.Exit(2)
	}
	options, err := cli.NewProjectOptions([]string{os.Args[1]},
		cli.WithOsEnv, cli.WithDotEnv, cli.WithProfiles([]string{"*"}), cli.WithResolvedPaths(true))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	project, err := options.LoadProject(context.Background())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	out, err := project.MarshalJSON()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(string(out))
}
