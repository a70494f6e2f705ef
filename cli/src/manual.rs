//! The man pages and their extra sections, generated from the grammar in
//! [`crate::args`] so they never drift from `--help`: the environment
//! variables are read off the flag definitions, the exit codes come from the
//! same text `--help` shows.

use std::io::Write;
use std::path::Path;

use clap::CommandFactory;

use crate::args::{Cli, EXIT_CODES_HELP};
use crate::report::{Failure, Outcome};

/// The top-level page: clap's sections plus ENVIRONMENT and EXIT STATUS.
pub fn render() -> Outcome<Vec<u8>> {
    let command = Cli::command();
    let man = clap_mangen::Man::new(command.clone());
    let mut page = Vec::new();
    let render = |page: &mut Vec<u8>| -> std::io::Result<()> {
        man.render_title(page)?;
        man.render_name_section(page)?;
        man.render_synopsis_section(page)?;
        man.render_description_section(page)?;
        man.render_options_section(page)?;
        man.render_subcommands_section(page)?;
        writeln!(page, ".SH ENVIRONMENT")?;
        for arg in command.get_arguments() {
            if let (Some(env), Some(help)) = (arg.get_env(), arg.get_help()) {
                writeln!(page, ".TP")?;
                writeln!(page, "\\fB{}\\fR", escape(&env.to_string_lossy()))?;
                writeln!(page, "{}", escape(&help.to_string()))?;
            }
        }
        writeln!(page, ".SH \"EXIT STATUS\"")?;
        for line in EXIT_CODES_HELP.lines().skip(1) {
            if let Some((code, meaning)) = line.trim().split_once(' ') {
                writeln!(page, ".TP\n\\fB{code}\\fR\n{}", escape(meaning.trim()))?;
            }
        }
        man.render_version_section(page)
    };
    render(&mut page).map_err(|e| Failure::io("man page", &e))?;
    Ok(page)
}

/// Writes `trove.1` and one page per subcommand into `dir`.
pub fn write_all(dir: &Path) -> Outcome {
    let label = dir.display().to_string();
    std::fs::create_dir_all(dir).map_err(|e| Failure::io(&label, &e))?;
    clap_mangen::generate_to(Cli::command(), dir).map_err(|e| Failure::io(&label, &e))?;
    // generate_to wrote a plain trove.1; the full one replaces it.
    std::fs::write(dir.join("trove.1"), render()?).map_err(|e| Failure::io(&label, &e))
}

/// Writes generated text to standard output.
pub fn write_stdout(bytes: &[u8]) -> Outcome {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| Failure::stdout(&e))
}

/// Escapes text for roff: backslashes, hyphens and a leading dot or quote.
fn escape(text: &str) -> String {
    let escaped = text.replace('\\', "\\e").replace('-', "\\-");
    if escaped.starts_with(['.', '\'']) {
        format!("\\&{escaped}")
    } else {
        escaped
    }
}
