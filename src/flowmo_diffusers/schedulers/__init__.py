from .scheduling_flowmo import FlowMoScheduler
