// Command ternimage writes Tern's container image tarball (make image).
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/ternlabs/tern/internal/image"
)

func main() {
	out := flag.String("out", "bin/tern-image.tar", "image tarball to write")
	tag := flag.String("tag", "ghcr.io/ternlabs/tern:latest", "image name and tag")
	flag.Parse()
	if flag.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "usage: ternimage [--out FILE] [--tag TAG] BINARY...")
		os.Exit(2)
	}
	img, err := image.Build(flag.Args())
	if err == nil {
		err = image.Write(*out, *tag, img)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "ternimage: %v\n", err)
		os.Exit(1)
	}
	d, _ := img.Digest()
	fmt.Printf("%s %s %s\n", *out, *tag, d)
}
