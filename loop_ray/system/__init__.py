"""The Ray shells of loop-ray: samplers, reward actors, buffer, learner group, weight publication
and the driver that orders them (named `system`, not `ray`, so as not to shadow the library)."""
