//! What the kernel's verifier said when it refused a program, cut to what a report can hold.

/// Lines of the verifier's output kept in a probe's problem: its verdict and statistics come
/// last. The whole output (megabytes for a program too large) goes to the debug log, not into
/// every report and JSON document.
const VERIFIER_LINES_KEPT: usize = 4;

/// Why the kernel refused `program`, with the verifier's output cut to its last lines.
pub fn refused(what: &str, program: &str, error: &aya::programs::ProgramError) -> String {
    let text = format!("{error:#}");
    let short = shorten_verifier_output(&text);
    if short.len() < text.len() {
        tracing::debug!("the verifier's output for {program}: {text}");
    }
    format!("{what}: {short}")
}

/// `text` (aya's load error) with its verifier output cut to the last
/// [`VERIFIER_LINES_KEPT`] lines, joined by " / ".
fn shorten_verifier_output(text: &str) -> String {
    let Some((head, output)) = text.split_once("Verifier output:") else {
        return text.to_string();
    };
    let lines: Vec<&str> = output
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    if lines.len() <= VERIFIER_LINES_KEPT {
        return text.to_string();
    }
    format!(
        "{head}Verifier output, last {VERIFIER_LINES_KEPT} of {} lines (RUST_LOG=debug logs \
         all of them): {}",
        lines.len(),
        lines[lines.len() - VERIFIER_LINES_KEPT..].join(" / ")
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_refusal_keeps_the_verifiers_verdict_not_its_whole_output() {
        let mut text = String::from(
            "the BPF_PROG_LOAD syscall returned Argument list too long (os error 7). \
             Verifier output: 0: R1=ctx() R10=fp0\n",
        );
        for line in 0..100_000 {
            text.push_str(&format!("{line}: (bf) r0 = r4\n"));
        }
        text.push_str(
            "BPF program is too large. Processed 1000001 insn\nverification time 2402077 usec\n\
             stack depth 176+0\nprocessed 1000001 insns (limit 1000000) max_states_per_insn 39\n",
        );
        let short = super::shorten_verifier_output(&text);
        assert_eq!(
            short,
            "the BPF_PROG_LOAD syscall returned Argument list too long (os error 7). Verifier \
             output, last 4 of 100005 lines (RUST_LOG=debug logs all of them): BPF program is \
             too large. Processed 1000001 insn / verification time 2402077 usec / stack depth \
             176+0 / processed 1000001 insns (limit 1000000) max_states_per_insn 39"
        );
        let brief = "the BPF_PROG_LOAD syscall returned EPERM. Verifier output: one\ntwo\n";
        assert_eq!(super::shorten_verifier_output(brief), brief);
        assert_eq!(
            super::shorten_verifier_output("no such program"),
            "no such program"
        );
    }
}
