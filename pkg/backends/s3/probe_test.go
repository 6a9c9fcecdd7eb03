package s3

import (
	"bytes"
	"context"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/csi-nbd/csi-nbd/internal/testserver"
)

func TestProbe(t *testing.T) {
	v := testserver.StartVersitygw(t)
	v.CreateBucket("bkt")
	c := v.Client()
	ctx := context.Background()
	put := func(body string, in *s3.PutObjectInput) {
		in.Bucket = aws.String("bkt")
		in.Key = aws.String("k")
		in.Body = bytes.NewReader([]byte(body))
		out, err := c.PutObject(ctx, in)
		if err != nil {
			t.Logf("put %q: %v", body, err)
			return
		}
		t.Logf("put %q ok etag %s", body, aws.ToString(out.ETag))
	}
	put("1", &s3.PutObjectInput{IfNoneMatch: aws.String("*")})
	put("2", &s3.PutObjectInput{IfNoneMatch: aws.String("*")})
	put("3", &s3.PutObjectInput{IfMatch: aws.String(`"bogus"`)})
	h, _ := c.HeadObject(ctx, &s3.HeadObjectInput{Bucket: aws.String("bkt"), Key: aws.String("k")})
	put("4", &s3.PutObjectInput{IfMatch: h.ETag})
	_, err := c.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: aws.String("bkt"), Key: aws.String("k"), IfMatch: aws.String(`"bogus"`)})
	t.Logf("delete if-match bogus: %v", err)
	_, err = c.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String("nob"), Key: aws.String("k")})
	t.Logf("get missing bucket: %v", err)
	_, err = c.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String("bkt"), Key: aws.String("nokey")})
	t.Logf("get missing key: %v", err)
	_, err = c.HeadObject(ctx, &s3.HeadObjectInput{Bucket: aws.String("nob"), Key: aws.String("k")})
	t.Logf("head missing bucket: %v", err)
	_, err = c.ListObjectsV2(ctx, &s3.ListObjectsV2Input{Bucket: aws.String("nob")})
	t.Logf("list missing bucket: %v", err)
	_, err = c.CopyObject(ctx, &s3.CopyObjectInput{Bucket: aws.String("bkt"), Key: aws.String("k2"), CopySource: aws.String("bkt/k")})
	t.Logf("copy: %v", err)
	_, err = c.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String("bkt"), Key: aws.String("k"), Range: aws.String("bytes=0-0")})
	t.Logf("range get: %v", err)
}
