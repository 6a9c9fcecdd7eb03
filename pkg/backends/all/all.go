// Package all links in every backend and filter: a binary imports it once
// (for its side effects) instead of listing them. Add new backend and
// filter packages here.
package all

import (
	_ "github.com/csi-nbd/csi-nbd/pkg/backends/cache"     // cache= filter: local-disk block cache
	_ "github.com/csi-nbd/csi-nbd/pkg/backends/cow"       // cow= filter: copy-on-write overlay
	_ "github.com/csi-nbd/csi-nbd/pkg/backends/data"      // data: URIs
	_ "github.com/csi-nbd/csi-nbd/pkg/backends/file"      // file:///path: local files and block devices
	_ "github.com/csi-nbd/csi-nbd/pkg/backends/http"      // http(s) origins, read-only
	_ "github.com/csi-nbd/csi-nbd/pkg/backends/memory"    // sparse RAM disks
	_ "github.com/csi-nbd/csi-nbd/pkg/backends/nbdremote" // nbd://, nbds://, nbd+unix://: other NBD servers
	_ "github.com/csi-nbd/csi-nbd/pkg/backends/rate"      // rate filter: per-volume QoS
	_ "github.com/csi-nbd/csi-nbd/pkg/backends/readahead" // readahead filter
	_ "github.com/csi-nbd/csi-nbd/pkg/backends/s3"        // volumes in S3 buckets
)
