"""The device mesh, logical-axis rules, sequence layouts, ring / all-gather attention,
sequence-sharded SSD and conv, and `SequenceSharding`, the sharded ops object the mixers call
when rows are split over devices. Imports only lcjax.kernels (and lcjax.config)."""
