package backends

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// OptionKind is the type of an option's value; it decides how a value is
// validated and what its canonical spelling is.
//
// There is deliberately no kind for secrets: a spec is logged, stored in
// PersistentVolume objects and shown in events, so options may only name a
// secret (a Kubernetes Secret, a file path) and never hold its value.
type OptionKind int

const (
	OptSize     OptionKind = iota + 1 // byte count, canonical FormatSize form ("64Mi")
	OptBool                           // true/false (also 1/0, yes/no, on/off), canonical "true"/"false"
	OptInt                            // signed decimal integer
	OptDuration                       // non-negative time.Duration, canonical time.Duration.String form
	OptEnum                           // one of Option.Enum, exactly
	OptString                         // any string, kept as is
)

func (k OptionKind) String() string {
	switch k {
	case OptSize:
		return "size"
	case OptBool:
		return "bool"
	case OptInt:
		return "int"
	case OptDuration:
		return "duration"
	case OptEnum:
		return "enum"
	case OptString:
		return "string"
	}
	return "OptionKind(" + strconv.Itoa(int(k)) + ")"
}

// Option describes one KEY=VALUE option a backend or filter accepts.
type Option struct {
	Key  string // matches [a-z][a-z0-9-]*
	Kind OptionKind
	// Default is the value used when the option is absent, in canonical
	// form; a spec that sets the default explicitly has it dropped, so one
	// volume has one canonical name. "" means no default.
	Default string
	// Required options without a default must be given.
	Required bool
	Enum     []string // allowed values of an OptEnum
	Doc      string
}

var keyRE = regexp.MustCompile(`^[a-z][a-z0-9-]*$`)

func validKey(k string) bool { return keyRE.MatchString(k) }

// canonical validates v for option o and returns its canonical spelling.
// It is idempotent: canonical(canonical(v)) == canonical(v).
func (o Option) canonical(v string) (string, error) {
	switch o.Kind {
	case OptSize:
		n, err := ParseSize(v)
		if err != nil {
			return "", err
		}
		return FormatSize(n), nil
	case OptBool:
		b, err := parseBool(v)
		if err != nil {
			return "", err
		}
		return strconv.FormatBool(b), nil
	case OptInt:
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return "", fmt.Errorf("invalid integer %s", quote(v))
		}
		return strconv.FormatInt(n, 10), nil
	case OptDuration:
		d, err := parseDuration(v)
		if err != nil {
			return "", err
		}
		return d.String(), nil
	case OptEnum:
		for _, e := range o.Enum {
			if v == e {
				return v, nil
			}
		}
		return "", fmt.Errorf("invalid value %s (want one of: %s)", quote(v), strings.Join(o.Enum, ", "))
	case OptString:
		return v, nil
	}
	return "", fmt.Errorf("option has unknown kind %v", o.Kind)
}

func parseBool(v string) (bool, error) {
	switch strings.ToLower(v) {
	case "true", "t", "1", "yes", "y", "on":
		return true, nil
	case "false", "f", "0", "no", "n", "off":
		return false, nil
	}
	return false, fmt.Errorf("invalid bool %s (want true or false)", quote(v))
}

func parseDuration(v string) (time.Duration, error) {
	d, err := time.ParseDuration(v)
	if err != nil {
		return 0, fmt.Errorf("invalid duration %s (want e.g. 30s, 5m, 1h30m)", quote(v))
	}
	if d < 0 {
		return 0, fmt.Errorf("invalid duration %s: negative", quote(v))
	}
	return d, nil
}

// check reports a malformed option declaration (a programming error).
func (o Option) check() error {
	if !validKey(o.Key) {
		return fmt.Errorf("option key %q does not match [a-z][a-z0-9-]*", o.Key)
	}
	if o.Kind < OptSize || o.Kind > OptString {
		return fmt.Errorf("option %q: invalid kind %d", o.Key, int(o.Kind))
	}
	if o.Kind == OptEnum && len(o.Enum) == 0 {
		return fmt.Errorf("option %q: enum without values", o.Key)
	}
	if o.Required && o.Default != "" {
		return fmt.Errorf("option %q: required with a default", o.Key)
	}
	if o.Default != "" {
		c, err := o.canonical(o.Default)
		if err != nil {
			return fmt.Errorf("option %q: default: %w", o.Key, err)
		}
		if c != o.Default {
			return fmt.Errorf("option %q: default %q is not canonical (want %q)", o.Key, o.Default, c)
		}
	}
	return nil
}
