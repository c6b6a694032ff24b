from .flow_match_euler import FlowMatchEulerDiscreteScheduler, FlowMatchEulerDiscreteSchedulerOutput

__all__ = ["FlowMatchEulerDiscreteScheduler", "FlowMatchEulerDiscreteSchedulerOutput"]
