"""Observability: plain counters on the data path, Prometheus export at scrape time, the
event ring, the access log, `/explain` and the status page's data.

The data path only ever does `obj.field += n` on objects it already holds (a host's
`ClusterStats`, an upstream set's `UpstreamStats`, the DNS server's `DnsStats`); the
collector walks them when `/metrics` is scraped. See `collector` for the metric names and
`workers` for how `--workers N` processes report into one exposition.
"""
