// The programs are in the binary target; this empty library lets the agent
// name the crate as a build dependency, so cargo rebuilds it when they change.
#![no_std]
