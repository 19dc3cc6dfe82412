"""`sorting serve`: the loop as a long-running service on the sorter's control PC.

The loop runs in the main thread of its process (``loop``) and, between chunks, publishes a
snapshot of its state and applies setpoint changes. The operator page, the Prometheus
metrics and the OPC UA server run in a separate process (``web``, ``opcua``) that reads the
snapshots: they never hold anything the loop waits for. ``wire`` is the message format
between the two, ``control`` the loop process's side of setpoint changes, ``rotate`` the
event log that rotates by size or hour, ``audit`` the record of every change.
"""
