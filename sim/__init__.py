"""The discrete-event simulator: workloads, simulated workers and SLO timelines, driving the
controller core on a virtual clock."""
