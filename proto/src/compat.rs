//! The compatibility rule of `chat.v1`, checked against the last released schema: fields are
//! only ever added. Every message, field (number, name, type, label, oneof), enum and enum value
//! of the released schema must still be there, unchanged.

use std::collections::HashMap;

use prost::Message as _;
use prost_types::{DescriptorProto, FileDescriptorSet};

/// Flattens messages (with nested ones) by full name.
fn messages(set: &FileDescriptorSet) -> HashMap<String, DescriptorProto> {
    fn walk(prefix: &str, m: &DescriptorProto, out: &mut HashMap<String, DescriptorProto>) {
        let name = format!("{prefix}.{}", m.name());
        for n in &m.nested_type {
            walk(&name, n, out);
        }
        out.insert(name, m.clone());
    }
    let mut out = HashMap::new();
    for f in &set.file {
        for m in &f.message_type {
            walk(&format!(".{}", f.package()), m, &mut out);
        }
    }
    out
}

/// Every way `current` breaks `released`; empty when it only adds.
pub fn breaking_changes(released: &FileDescriptorSet, current: &FileDescriptorSet) -> Vec<String> {
    let (old, new) = (messages(released), messages(current));
    let mut problems = Vec::new();
    for (name, om) in &old {
        let Some(nm) = new.get(name) else {
            problems.push(format!("message {name} was removed"));
            continue;
        };
        let oneof = |m: &DescriptorProto, i: Option<i32>| {
            i.and_then(|i| m.oneof_decl.get(i as usize))
                .map(|o| o.name().to_owned())
        };
        for of in &om.field {
            match nm.field.iter().find(|f| f.number() == of.number()) {
                None => problems.push(format!(
                    "{name}: field {} ({}) was removed",
                    of.number(),
                    of.name()
                )),
                Some(nf) => {
                    if nf.name() != of.name() {
                        problems.push(format!(
                            "{name}: field {} renamed {} -> {}",
                            of.number(),
                            of.name(),
                            nf.name()
                        ));
                    }
                    if nf.r#type() != of.r#type() || nf.type_name() != of.type_name() {
                        problems.push(format!("{name}.{}: type changed", of.name()));
                    }
                    if nf.label() != of.label() {
                        problems.push(format!("{name}.{}: label changed", of.name()));
                    }
                    if oneof(om, of.oneof_index) != oneof(nm, nf.oneof_index) {
                        problems.push(format!("{name}.{}: moved in or out of a oneof", of.name()));
                    }
                }
            }
        }
    }
    for (of, nf) in released.file.iter().zip(&current.file) {
        for oe in &of.enum_type {
            match nf.enum_type.iter().find(|e| e.name() == oe.name()) {
                None => problems.push(format!("enum {} was removed", oe.name())),
                Some(ne) => {
                    for v in &oe.value {
                        if !ne
                            .value
                            .iter()
                            .any(|n| n.number() == v.number() && n.name() == v.name())
                        {
                            problems.push(format!(
                                "enum {}: value {} changed or removed",
                                oe.name(),
                                v.name()
                            ));
                        }
                    }
                }
            }
        }
    }
    problems.sort();
    problems
}

/// The descriptors of the current schema and of the last released one.
pub fn descriptor_sets() -> (FileDescriptorSet, FileDescriptorSet) {
    let current = include_bytes!(concat!(env!("OUT_DIR"), "/chat_v1_descriptor.bin"));
    let released = include_bytes!(concat!(env!("OUT_DIR"), "/chat_v1_released.bin"));
    (
        FileDescriptorSet::decode(released.as_slice()).expect("build.rs wrote a descriptor set"),
        FileDescriptorSet::decode(current.as_slice()).expect("build.rs wrote a descriptor set"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::field_descriptor_proto::Type;

    #[test]
    fn the_schema_only_adds_to_the_released_one() {
        let (released, current) = descriptor_sets();
        assert!(messages(&released).contains_key(".chat.v1.ChatMessage"));
        assert_eq!(breaking_changes(&released, &current), Vec::<String>::new());
    }

    #[test]
    fn the_check_catches_each_kind_of_break() {
        let (released, _) = descriptor_sets();
        let edit = |f: &dyn Fn(&mut DescriptorProto)| {
            let mut s = released.clone();
            let file = s
                .file
                .iter_mut()
                .find(|f| f.package() == "chat.v1")
                .expect("chat.v1");
            let m = file
                .message_type
                .iter_mut()
                .find(|m| m.name() == "ChatMessage")
                .expect("ChatMessage");
            f(m);
            breaking_changes(&released, &s)
        };
        assert_eq!(edit(&|m| m.field.retain(|f| f.name() != "body")).len(), 1);
        assert_eq!(edit(&|m| m.field[0].name = Some("renamed".into())).len(), 1);
        assert_eq!(edit(&|m| m.field[0].set_type(Type::Bytes)).len(), 1);
        assert_eq!(edit(&|m| m.name = Some("Other".into())).len(), 1);
        // Adding a field is fine.
        assert!(edit(&|m| {
            let mut f = m.field[0].clone();
            f.number = Some(99);
            f.name = Some("added".into());
            m.field.push(f);
        })
        .is_empty());
    }
}
