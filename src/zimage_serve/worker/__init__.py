"""Workers: what takes jobs from the queue and runs them on a device.

`loop` is the worker itself (claims, runs through the executor, records the end); `process` runs one in
a child process of the server, `cluster` one that serves a cluster's Redis queue (in a process of its
own or beside an API node), and `cluster_workers` is an API node's handle on those. They talk through
`messages` (typed, over a pipe or, as JSON, over the Redis `bus`); `deadlines` keeps jobs' time limits;
`image_tally` counts the images a job's samplers make against its owner's day.
"""
