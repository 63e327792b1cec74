//! Dictionary affinity (issue: affinity). Not built yet: chunking, the codec and the affinity engine land here.
