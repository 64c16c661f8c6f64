from .pipeline_flowmo import FlowMoPipeline
