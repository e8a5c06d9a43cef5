"""The admin surface of a running primary: the transport-free command set (`api`) and
the DPDK telemetry v2 socket that serves it (`telemetry`)."""
