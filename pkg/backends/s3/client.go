package s3

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	awsconfig "github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/aws/smithy-go"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// bucket is one volume's view of the object store: the SDK client, the
// location and the per-operation time limit. Every method names the
// endpoint and key in its errors, never the credentials.
type bucket struct {
	api      *s3.Client
	loc      Location
	endpoint string // for messages: the option, or "AWS"
	timeout  time.Duration
}

// newBucket builds the client for c. Credentials come from env's secrets
// when access-key-id is there, else from the standard AWS chain.
func newBucket(ctx context.Context, c *config, env backends.Env) (*bucket, error) {
	var roots *x509.CertPool
	if c.ca != "" {
		var err error
		if roots, err = backends.SystemCertPoolWith(c.ca); err != nil {
			return nil, fmt.Errorf("s3: option %q: %w", "ca", err)
		}
	}
	httpClient := awshttp.NewBuildableClient().WithTransportOptions(func(t *http.Transport) {
		// Keep a connection per request in flight, or every chunk
		// past the default 10 pays a new TCP (and TLS) handshake.
		t.MaxIdleConns = 2 * c.parallel
		t.MaxIdleConnsPerHost = 2 * c.parallel
		if roots != nil {
			if t.TLSClientConfig == nil {
				t.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
			}
			t.TLSClientConfig.RootCAs = roots
		}
	}).WithDialerOptions(func(d *net.Dialer) {
		d.Timeout = min(c.timeout, 10*time.Second)
	})
	opts := []func(*awsconfig.LoadOptions) error{
		awsconfig.WithRegion(c.region),
		awsconfig.WithHTTPClient(httpClient),
		awsconfig.WithRetryer(func() aws.Retryer {
			return retry.NewStandard(func(o *retry.StandardOptions) {
				o.MaxAttempts = 3
				o.MaxBackoff = 2 * time.Second
			})
		}),
	}
	if id, ok := env.Secret("access-key-id"); ok {
		secret, _ := env.Secret("secret-access-key")
		token, _ := env.Secret("session-token")
		if secret == "" {
			return nil, errors.New("s3: secret access-key-id is set but secret-access-key is missing")
		}
		opts = append(opts, awsconfig.WithCredentialsProvider(
			credentials.NewStaticCredentialsProvider(id, secret, token)))
	}
	cfg, err := awsconfig.LoadDefaultConfig(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("s3: AWS configuration: %w", err)
	}
	api := s3.NewFromConfig(cfg, func(o *s3.Options) {
		if c.endpoint != "" {
			o.BaseEndpoint = aws.String(c.endpoint)
		}
		o.UsePathStyle = c.pathStyle
		// Checksums only where the API demands them: S3-compatible
		// servers vary in the newer checksum headers they accept.
		o.RequestChecksumCalculation = aws.RequestChecksumCalculationWhenRequired
		o.ResponseChecksumValidation = aws.ResponseChecksumValidationWhenRequired
		if !strings.HasPrefix(c.endpoint, "http://") {
			// Over TLS the payload is protected in transit: skip
			// hashing every chunk for the signature (what the AWS CLI
			// does too). Plain HTTP keeps the signed SHA-256.
			o.APIOptions = append(o.APIOptions, v4.SwapComputePayloadSHA256ForUnsignedPayloadMiddleware)
		}
	})
	ep := c.endpoint
	if ep == "" {
		ep = "AWS " + c.region
	}
	return &bucket{api: api, loc: c.loc, endpoint: ep, timeout: c.timeout}, nil
}

// op bounds one operation (retries included) by the configured timeout.
func (b *bucket) op(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, b.timeout)
}

// wrap names the operation, endpoint and key, and maps the failure onto
// an errno the NBD server understands (EIO unless something fits better).
func (b *bucket) wrap(err error, what, key string) error {
	if err == nil {
		return nil
	}
	where := fmt.Sprintf("s3: %s s3://%s/%s at %s", what, b.loc.Bucket, key, b.endpoint)
	switch {
	case isCode(err, "NoSuchBucket"):
		return fmt.Errorf("%s: bucket %q does not exist: %w", where, b.loc.Bucket, errors.Join(ErrNoBucket, syscall.EIO))
	case isCode(err, "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden",
		"XAdminUserNotFound", "InvalidToken", "ExpiredToken"), httpStatus(err) == http.StatusForbidden:
		return fmt.Errorf("%s: access denied (check the credentials): %w", where, errors.Join(err, syscall.EACCES))
	case errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("%s: no answer within %s: %w", where, b.timeout, errors.Join(err, syscall.EIO))
	case errors.Is(err, context.Canceled):
		return fmt.Errorf("%s: %w", where, err)
	}
	var ne net.Error
	if errors.As(err, &ne) || errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("%s: endpoint unreachable: %w", where, errors.Join(err, syscall.EIO))
	}
	return fmt.Errorf("%s: %w", where, errors.Join(err, syscall.EIO))
}

// isCode reports whether err is an S3 API error with one of codes.
func isCode(err error, codes ...string) bool {
	var ae smithy.APIError
	if !errors.As(err, &ae) {
		return false
	}
	for _, c := range codes {
		if ae.ErrorCode() == c {
			return true
		}
	}
	return false
}

func httpStatus(err error) int {
	var re *awshttp.ResponseError
	if errors.As(err, &re) {
		return re.HTTPStatusCode()
	}
	return 0
}

// isNotFound: the key (not the bucket) is missing.
func isNotFound(err error) bool {
	var nsk *types.NoSuchKey
	var nf *types.NotFound
	if errors.As(err, &nsk) || errors.As(err, &nf) {
		return true
	}
	return isCode(err, "NoSuchKey", "NotFound")
}

// isPrecondition: a conditional write lost (If-Match / If-None-Match).
func isPrecondition(err error) bool {
	if isCode(err, "PreconditionFailed", "ConditionalRequestConflict") {
		return true
	}
	var re *awshttp.ResponseError
	return errors.As(err, &re) && (re.HTTPStatusCode() == http.StatusPreconditionFailed ||
		re.HTTPStatusCode() == http.StatusConflict)
}

// get reads key (the range [off, off+len(p)) of it) into p, zero-filling
// what the object lacks. found is false if there is no such object.
func (b *bucket) get(ctx context.Context, key string, p []byte, off uint64) (found bool, err error) {
	ctx, cancel := b.op(ctx)
	defer cancel()
	in := &s3.GetObjectInput{Bucket: &b.loc.Bucket, Key: &key}
	in.Range = aws.String(fmt.Sprintf("bytes=%d-%d", off, off+uint64(len(p))-1))
	out, err := b.api.GetObject(ctx, in)
	if err != nil {
		if isNotFound(err) {
			clear(p)
			return false, nil
		}
		if isCode(err, "InvalidRange") {
			// The object is shorter than the range: all zeros here.
			clear(p)
			return true, nil
		}
		return false, b.wrap(err, "read", key)
	}
	defer out.Body.Close()
	n, err := io.ReadFull(out.Body, p)
	if err == io.ErrUnexpectedEOF && (out.ContentLength == nil || int64(n) < *out.ContentLength) {
		// A connection that ends early looks like a short object to
		// ReadFull; only the announced length tells them apart.
		err = fmt.Errorf("got %d of %d bytes: %w", n, aws.ToInt64(out.ContentLength), err)
	} else if err == io.ErrUnexpectedEOF {
		err = nil // a short object: the rest reads as zeros
	}
	if err != nil {
		return false, b.wrap(err, "read", key)
	}
	clear(p[n:])
	return true, nil
}

// getSmall reads a whole small object (metadata, lease) with its ETag.
func (b *bucket) getSmall(ctx context.Context, key string) (body []byte, etag string, err error) {
	ctx, cancel := b.op(ctx)
	defer cancel()
	out, err := b.api.GetObject(ctx, &s3.GetObjectInput{Bucket: &b.loc.Bucket, Key: &key})
	if err != nil {
		if isNotFound(err) {
			return nil, "", errNoObject
		}
		return nil, "", b.wrap(err, "read", key)
	}
	defer out.Body.Close()
	body, err = io.ReadAll(io.LimitReader(out.Body, 1<<20))
	if err != nil {
		return nil, "", b.wrap(err, "read", key)
	}
	return body, aws.ToString(out.ETag), nil
}

// errNoObject is getSmall's "no such key".
var errNoObject = errors.New("no such object")

// cond is a precondition for put and del: ifNoneMatch ("create only") or
// ifMatch (an ETag: "replace only that version").
type cond struct {
	ifNoneMatch bool
	ifMatch     string
}

// errPrecondition is put's and del's "the precondition did not hold".
var errPrecondition = errors.New("precondition failed")

// put stores body under key and returns the new ETag.
func (b *bucket) put(ctx context.Context, key string, body []byte, c cond) (string, error) {
	ctx, cancel := b.op(ctx)
	defer cancel()
	in := &s3.PutObjectInput{
		Bucket: &b.loc.Bucket, Key: &key,
		Body:          bytes.NewReader(body),
		ContentLength: aws.Int64(int64(len(body))),
	}
	if c.ifNoneMatch {
		in.IfNoneMatch = aws.String("*")
	}
	if c.ifMatch != "" {
		in.IfMatch = aws.String(c.ifMatch)
	}
	out, err := b.api.PutObject(ctx, in)
	if err != nil {
		if (c.ifNoneMatch || c.ifMatch != "") && isPrecondition(err) {
			return "", errPrecondition
		}
		return "", b.wrap(err, "write", key)
	}
	return aws.ToString(out.ETag), nil
}

// del removes key; a missing key is success.
func (b *bucket) del(ctx context.Context, key string, c cond) error {
	ctx, cancel := b.op(ctx)
	defer cancel()
	in := &s3.DeleteObjectInput{Bucket: &b.loc.Bucket, Key: &key}
	if c.ifMatch != "" {
		in.IfMatch = aws.String(c.ifMatch)
	}
	_, err := b.api.DeleteObject(ctx, in)
	if err != nil {
		if c.ifMatch != "" && isPrecondition(err) {
			return errPrecondition
		}
		if isNotFound(err) {
			return nil
		}
		return b.wrap(err, "delete", key)
	}
	return nil
}

// list calls fn with every key under prefix (a full key prefix, already
// joined with the location's), in order.
func (b *bucket) list(ctx context.Context, prefix string, fn func(key string) error) error {
	p := s3.NewListObjectsV2Paginator(b.api, &s3.ListObjectsV2Input{
		Bucket: &b.loc.Bucket, Prefix: &prefix})
	for p.HasMorePages() {
		octx, cancel := b.op(ctx)
		page, err := p.NextPage(octx)
		cancel()
		if err != nil {
			return b.wrap(err, "list", prefix)
		}
		for _, o := range page.Contents {
			if err := fn(aws.ToString(o.Key)); err != nil {
				return err
			}
		}
	}
	return nil
}

// copyObject copies srcBucket/srcKey to key in b's bucket, server-side.
func (b *bucket) copyObject(ctx context.Context, srcBucket, srcKey, key string) error {
	ctx, cancel := b.op(ctx)
	defer cancel()
	_, err := b.api.CopyObject(ctx, &s3.CopyObjectInput{
		Bucket: &b.loc.Bucket, Key: &key,
		CopySource: aws.String(srcBucket + "/" + escapeCopyKey(srcKey)),
	})
	return b.wrap(err, "copy to", key)
}

// escapeCopyKey URL-encodes a key for x-amz-copy-source, keeping '/'.
func escapeCopyKey(k string) string {
	var sb bytes.Buffer
	for i := 0; i < len(k); i++ {
		c := k[i]
		if 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
			c == '/' || c == '-' || c == '_' || c == '.' || c == '~' {
			sb.WriteByte(c)
		} else {
			fmt.Fprintf(&sb, "%%%02X", c)
		}
	}
	return sb.String()
}
