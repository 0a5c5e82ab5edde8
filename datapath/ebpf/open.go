package ebpf

// Open loads the node's programs and maps, or opens the pinned ones, as
// every other method does on first use. ADD calls it before it takes the
// network's records lock, which serialises ADDs and DELs: opening needs
// only the loader's own lock.
func (d *Datapath) Open() error { return d.open() }
