"""Helpers of the tests and the benchmarks, kept out of the installed package.

`f2bzmq.lab` is the demo's cluster on one machine; what only tests and benchmarks use
lives here: a node driven by hand (`nodeclient`), a hub on its own (`hub`), the daemons'
SQLite files read from outside (`state`), network namespaces (`netns`) and the cluster
whose nodes have real firewalls in them (`netlab`), and the real logrotate (`logrotate`).
"""
