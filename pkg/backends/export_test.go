package backends

// PoolRefs exposes a device's reference count to the external tests.
func PoolRefs(p *Pool, s Spec) int { return p.refs(s) }
